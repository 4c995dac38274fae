"""Generation on top of the engine: `generate` (one or a batch of conversations, streamed, with timings and
FLOPs), `batch_stream` (several requests streamed together), `likelihood` (log-probabilities of given
continuations), and `manager.ModelManager` (one loaded model shared by the app, the server and the plug-ins,
behind a lock). `concurrent` interleaves two streams (the baseline and the accelerated side).

May import: the engine and the models folders, and the top-level errors and validation modules.
"""
