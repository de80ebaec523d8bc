"""Tests for agent.daemon."""
