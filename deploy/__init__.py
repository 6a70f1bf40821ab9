"""Deployment: the bundle (policy + LYNX probe + Dr.LLM router) and the decoder that loads it."""
