"""The milter front-end (pymilter) and delivery at a time a message asks for."""
