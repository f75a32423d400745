"""The operator's tools beside the server: `moxylogalyze` (the message log analyser)."""
