"""Inference over HTTP: the wire format both ends share, the client, the server, its workers and Ray."""
