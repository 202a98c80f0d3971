"""`lmforge serve`: an OpenAI-compatible endpoint in front of an existing inference server.

resolve.py turns MODEL (registry alias, stage dir, model dir, GGUF file) into what a backend loads;
backends.py builds and runs the backend's command (transformers serve, llama.cpp, vLLM);
gateway.py is the front: API key, public model name, 404/400 errors, `n`, `stop`, following the champion.
"""
