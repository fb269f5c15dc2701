"""Models: configs, size presets, the variant registry and the decoder LM."""
