"""sae_pipeline: sparse autoencoders on transformer activations, orchestrated as a Dagster asset graph."""
