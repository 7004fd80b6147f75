"""``make demo``: the end-to-end run as staged ``omni-ds`` commands (``stages``) and its report
(``report``)."""
