"""Tests for agent.common."""
