"""Tests for agent.ws."""
