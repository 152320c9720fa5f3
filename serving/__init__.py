"""Ray Serve HTTP services: SVD (steering-vector decoding) and SIDeR (face anonymization)."""
