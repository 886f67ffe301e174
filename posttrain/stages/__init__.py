"""The stage drivers: each reads its data, builds its engines and runs the one step loop (loop.py).

    distill.run_distill(cfg, student, teacher, tok)   -> StageResult(<run>/distill/final, summary)
    warm.run_warm(cfg, backbone, tok)                 -> StageResult(<run>/warm/reward_model, table)
    policy.run_policy(cfg, student, tok, rm_path)     -> StageResult(<run>/policy/{bond,warp}/final, summary)

rl.py holds the RL plumbing J-BOND (policy.py) and WARP (policy_warp.py) share; the algorithms they
call are pure and live one level up (bond.py, warp.py, merge.py, losses.py, pg.py).
"""
