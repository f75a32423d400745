"""The operator's tools beside the server: `moxystats` (the counters, live) and
`moxylogalyze` (the message log analyser)."""
