"""A local Code Storage-compatible server: real git http-backend behind JWT checks."""
