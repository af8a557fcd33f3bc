"""Several Ollama backends behind one gate: their configuration, catalogue and placement."""
