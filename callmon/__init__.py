"""callmon: real-time call quality monitor with auto-ticketing."""

__version__ = "0.1.0"
