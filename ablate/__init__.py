"""ablate: controlled ablations of multimodal LLMs (see README.md and DESIGN notes)."""
