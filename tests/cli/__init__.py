"""Tests of the command line: every command, its bad-input messages and exit codes."""
