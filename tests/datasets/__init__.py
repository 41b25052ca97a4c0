"""Tests of the dataset preparation scripts in datasets/."""
