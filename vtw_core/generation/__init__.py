"""Generation on top of the engine: `generate` (one or a batch of conversations, streamed, with timings and
FLOPs), `batch_stream` (several requests streamed together), `likelihood` (log-probabilities of given
continuations), and `manager.ModelManager` (one loaded model shared by the app, the server and the plug-ins,
behind a lock). `concurrent` interleaves two streams (the baseline and the accelerated side). `types` holds the
values they pass around (SamplingConfig, GenerationStats, StreamEvent, GenerationResult); `streaming` the
per-reply bookkeeping that single and batched streaming share (text, events, timings, finish reason, running
out of memory).

May import: the engine and the models folders, and the top-level errors and validation modules.
"""
