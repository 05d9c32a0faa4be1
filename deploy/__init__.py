"""Deployment tooling: the capacity check and the manifest reading it shares with the tests."""
