"""Serving VTW to many clients through the OpenAI chat-completions API.

- `errors`: OpenAI's error body and the HTTP status of each failure;
- `protocol`: an OpenAI chat request -> conversation, images, method and sampling (every limit checked);
- `remote_images`: http(s) image URLs, only where the server allows them;
- `batching`: groups concurrent requests with the same method into one engine call, in one replica;
- `openai_api`: the FastAPI routes (`/v1/chat/completions`, `/v1/models`) over one ModelManager;
- `standalone`: `python -m vtw_core serve` (uvicorn, one process);
- `ray_app`: the same routes as a Ray Serve application, one model manager per replica.
"""
