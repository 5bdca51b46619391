"""The daemon's web page and JSON API (standard library http.server + server-sent events)."""
