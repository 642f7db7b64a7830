"""Load tools that drive a running kiln (or any OpenAI-compatible) server: `kiln bench ...`."""
