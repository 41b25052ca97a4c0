"""Tests of contrastive."""
