"""Hand-written model code the runtime serves: the Llama family (`llama.py`)."""
