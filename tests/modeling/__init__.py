"""Tests of modeling."""
