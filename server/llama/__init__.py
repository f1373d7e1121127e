"""llama.cpp loading, shared by the engine and the quantizer: one model loader and llama.cpp's log capture."""
