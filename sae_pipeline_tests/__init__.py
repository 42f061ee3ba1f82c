"""Tests for sae_pipeline; layout mirrors the package."""
