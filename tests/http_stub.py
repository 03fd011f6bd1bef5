"""A quiet HTTP request handler that answers JSON: the base of the tests' stand-in servers."""
import json
from http.server import BaseHTTPRequestHandler


class JSONHandler(BaseHTTPRequestHandler):
    """``_send(code, value)`` answers ``value`` as JSON; nothing is logged."""

    def log_message(self, *args):
        pass

    def _send(self, code, value):
        data = json.dumps(value).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
