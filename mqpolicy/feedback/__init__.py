"""Feedback from delivery results: the MTA's log followed and parsed, destinations backed off
and let recover."""
