"""SIDeR: identity-keeping face anonymization with password restoration, served on Ray Serve.

Paper: arXiv 2602.04994 (Bao et al., 2026). Modules:
    config.py       typed configuration (every reconstructed rule is a named switch)
    faces.py        dlib face stack: detection, landmarks, 128-d identity embeddings
    anonymize.py    the momentum search + the CPU appearance backend (the method, top to bottom)
    diffusion.py    the diffusion backend (local diffusers weights, GPU)
    crypto.py       Argon2id/scrypt -> AES-256-GCM envelope bound to the protected pixels
    restoration.py  bit-exact restore; token / PNG-chunk / in-pixel carriers
    service.py      the service without Ray or HTTP
    app.py          Ray Serve deployment + FastAPI ingress; app_builder(args)
"""
