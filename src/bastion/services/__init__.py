"""Turns validated wire requests into engine requests and engine events into wire responses."""
