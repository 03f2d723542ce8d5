"""The embedded demo world: procedural text-to-image data, tiny SD-family teachers, an evaluator."""
