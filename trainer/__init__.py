"""longkd.trainer: stream a cache and distil students under RoPE scaling schedules."""
