"""Tests for agent.connect."""
