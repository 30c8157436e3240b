"""Helpers shared by tests: the V2 spec as JSON schemas, request builders, generated gRPC stubs."""
