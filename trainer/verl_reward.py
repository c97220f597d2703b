"""verl's custom reward function, in a file verl can load by path.

verl imports `custom_reward_function.path` with `importlib.util.spec_from_file_location`, as a module outside any
package, where relative imports fail; this file therefore imports absolutely. Its path on your machine (an
editable install keeps it in the source tree, not under site-packages):

    python -c "import rewardserve.trainer.verl_reward as m; print(m.__file__)"

    custom_reward_function:
      path: <that path>
      name: compute_score
    # and in the workers' environment: REWARDSERVE_REWARD_URL=http://<server>:8000

`compute_score(data_source, solution_str, ground_truth, extra_info)` scores `solution_str` as the answer to
`extra_info["prompt"]`, on the server's default model (REWARDSERVE_REWARD_MODEL or REWARDSERVE_REWARD_COMBINATION
pick another; REWARDSERVE_REWARD_API_KEY is sent when set).
"""
from rewardserve.trainer.integrations import compute_score

__all__ = ["compute_score"]
