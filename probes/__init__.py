"""Run synthetic WebRTC calls and measure their quality."""
