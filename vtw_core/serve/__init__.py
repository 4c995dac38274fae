"""Serving VTW to many clients through the OpenAI chat-completions API.

- `protocol`: an OpenAI chat request -> conversation, images, method and sampling (every limit checked);
- `batching`: groups concurrent requests with the same method into one engine call, in one replica;
- `openai_api`: the FastAPI routes (`/v1/chat/completions`, `/v1/models`) over one ModelManager;
- `standalone`: `python -m vtw_core serve` (uvicorn, one process);
- `ray_app`: the same routes as a Ray Serve application, one model manager per replica.
"""
