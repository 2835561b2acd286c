"""The round vocabulary both ends speak (message types in the envelope's `type`).

aggregator → site                       site → aggregator
  plan        (after connecting)          preparing (progress while it computes what the rounds need)
                                          plan_accept / plan_reject (accept: prepared and ready)
  round_start (round r, global weights)   decline (budget exhausted, …)
  secagg      (one encoded core message)  secagg  (one encoded core message)
                                          plain_update (only when secure aggregation is off)
  round_end   (status, federated metrics)
  status      (to a connected site left out of a round: the round, how many take part, why not this site)
  done        (final weights)
  finished    (to a site that connects after the last round: the federation is over)

`core.agg_round` and `core.site_round` use these; `hemafed.network.protocol` re-exports them.
"""

PLAN = "plan"
PLAN_ACCEPT = "plan_accept"
PREPARING = "preparing"
PLAN_REJECT = "plan_reject"
ROUND_START = "round_start"
DECLINE = "decline"
SECAGG = "secagg"
PLAIN_UPDATE = "plain_update"
ROUND_END = "round_end"
DONE = "done"
STATUS = "status"
FINISHED = "finished"
