"""The overoptimisation monitor's rule, by hand."""
import math

from rewardserve.trainer.rl.gold import GoldEvaluation, GoldMonitor, gold_fell_while_proxy_rose


def evaluations(golds, proxies):
    return [GoldEvaluation(step, proxy, gold, kl=step / 10) for step, (gold, proxy) in
            enumerate(zip(golds, proxies), start=1)]


def test_stops_after_k_drops_in_a_row_while_the_proxy_rose():
    history = evaluations([1.0, 2.0, 1.5, 1.2], [0.1, 0.2, 0.3, 0.4])
    assert gold_fell_while_proxy_rose(history, 2)  # 2.0 -> 1.5 -> 1.2 while the proxy went 0.2 -> 0.4
    assert not gold_fell_while_proxy_rose(history, 3)  # 1.0 -> 2.0 rose
    assert not gold_fell_while_proxy_rose(history[:3], 2)  # one drop so far


def test_no_stop_when_the_proxy_fell_too_or_the_gold_only_wobbled():
    assert not gold_fell_while_proxy_rose(evaluations([2.0, 1.5, 1.2], [0.4, 0.3, 0.2]), 2)  # both fell
    assert not gold_fell_while_proxy_rose(evaluations([2.0, 1.5, 1.5], [0.1, 0.2, 0.3]), 2)  # a tie is no drop


def test_the_monitor_tracks_the_best_gold_and_reports_sqrt_kl():
    monitor = GoldMonitor(every=2, stop_on_drop=2)
    assert monitor.due(2) and not monitor.due(3)
    verdicts = [monitor.observe(e) for e in evaluations([1.0, 3.0, 2.0, 1.0], [0.1, 0.2, 0.3, 0.4])]
    assert [v.new_best for v in verdicts] == [True, True, False, False]
    assert [v.stop for v in verdicts] == [False, False, False, True]
    assert verdicts[-1].metrics["gold/best_step"] == 2 and verdicts[-1].metrics["gold/best_reward_mean"] == 3.0
    assert verdicts[-1].metrics["gold/sqrt_kl"] == math.sqrt(0.4)
    resumed = GoldMonitor.from_records(2, 2, [{"step": 2, "reward_mean": 0.5, "gold/reward_mean": 1.5, "kl": 0.04},
                                              {"step": 3, "reward_mean": 0.6, "kl": 0.05}])
    assert resumed.history == [GoldEvaluation(2, 0.5, 1.5, 0.04)] and resumed.best.step == 2
