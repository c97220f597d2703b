"""Every Prometheus collector of the server, in one place.

Latency is split into the three places a request spends time: tokenizing, waiting in the batcher's queue, and
the forward pass of the batch that carried it.
"""
from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

PROTOCOLS = ("http", "grpc", "python")  # how a request came: an adapter, or a caller of the core in process
REQUESTS = Counter("rewardserve_requests_total", "Requests answered, by outcome (ok or error kind) and protocol",
                   ["outcome", "protocol"])
ITEMS = Counter("rewardserve_items_total", "Items scored")
TOKENS = Counter("rewardserve_tokens_total", "Real (unpadded) tokens scored")
PADDED_TOKENS = Counter("rewardserve_padded_tokens_total", "Tokens computed including padding")
MODEL_TOKENS = Counter("rewardserve_model_tokens_total", "Tokens clients sent, by model", ["model"])
COMPUTED_TOKENS = Counter("rewardserve_computed_tokens_total",
                          "Tokens the forward ran, by model: padding included where a model is scored padded,"
                          " a shared prefix counted once", ["model"])
TRUNCATED = Counter("rewardserve_truncated_items_total", "Items cut to max_length")
ERRORS = Counter("rewardserve_errors_total", "Errors answered, by kind", ["kind"])
CANCELLED = Counter("rewardserve_cancelled_items_total", "Items dropped before the forward: their client had gone")
UNSCORABLE = Counter("rewardserve_unscorable_items_total",
                     "Items answered an error alone: the forward failed on them, or their score was not finite")
OOM_SPLITS = Counter("rewardserve_oom_splits_total", "Batches split in two after running out of device memory")

MODEL_ITEMS = Counter("rewardserve_model_items_total", "Items scored, by model, version and protocol",
                      ["model", "version", "protocol"])
MODEL_INFO = Gauge("rewardserve_model_info", "1 for each model version now serving (no paths: /metrics is open)",
                   ["model", "version"])
FORWARD_CONFIG = Gauge("rewardserve_forward_budget_tokens",
                       "The token budget each model serves with, labelled with its forward path (calibrated at start)",
                       ["model", "forward"])
CALIBRATION = Gauge("rewardserve_calibration_tokens_per_second",
                    "Tokens/s each candidate forward path and budget reached in the start-up calibration",
                    ["model", "forward", "budget"])
FORWARDS = Counter("rewardserve_forwards_total",
                   "Forward passes by model and the forward path that ran: the attention kernel its layers called"
                   " (counted)", ["model", "forward"])
FALLBACKS = Counter("rewardserve_kernel_fallbacks_total",
                    "Forward passes whose planned kernel failed, by model and the forward path that ran instead",
                    ["model", "forward"])
RELOADS = Counter("rewardserve_reloads_total", "Reloads asked for, by model and outcome", ["model", "outcome"])

VERIFIER_CHECKS = Counter("rewardserve_verifier_checks_total",
                          "Answer checks by verifier and verdict (correct, wrong, no_answer, timeout, error)",
                          ["verifier", "verdict"])
VERIFIER_CHECK_SECONDS = Histogram("rewardserve_verifier_check_seconds",
                                   "One answer check in a worker process, by verifier (a timeout counts its limit)",
                                   ["verifier"], buckets=LATENCY_BUCKETS)

INFLIGHT_CHARACTERS = Gauge("rewardserve_inflight_characters",
                            "Characters of requests admitted and not yet answered (--max-inflight-characters)")
QUEUE_DEPTH = Gauge("rewardserve_queue_depth", "Items waiting for a batch")
BATCH_SIZE = Histogram("rewardserve_batch_size", "Items per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
BATCH_TOKENS = Histogram(
    "rewardserve_batch_tokens", "Padded tokens per forward pass", buckets=tuple(2**k for k in range(6, 19))
)

REQUEST_LATENCY = Histogram("rewardserve_request_seconds", "Whole request, in the core", buckets=LATENCY_BUCKETS)
TOKENIZE_LATENCY = Histogram("rewardserve_tokenize_seconds", "Tokenizing one request", buckets=LATENCY_BUCKETS)
QUEUE_LATENCY = Histogram("rewardserve_queue_seconds", "Item wait from submit to its forward", buckets=LATENCY_BUCKETS)
FORWARD_LATENCY = Histogram("rewardserve_forward_seconds", "One batch's forward pass", buckets=LATENCY_BUCKETS)


def serving_path(model: str, path: str, budget: int) -> None:
    """One FORWARD_CONFIG series per model: the path it serves with now (at start, after a reload or a fallback)."""
    for metric in FORWARD_CONFIG.collect():
        for sample in metric.samples:
            if sample.labels.get("model") == model and sample.labels.get("forward") != path:
                FORWARD_CONFIG.remove(model, sample.labels["forward"])
    FORWARD_CONFIG.labels(model, path).set(budget)
