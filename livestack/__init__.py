"""livestack: live stacking for astrophotography."""
import logging

__version__ = "0.1.0"

# A session's milestones — started or resumed, plate-solved, archived, stopped — are neither problems nor
# per-frame chatter: syslog's NOTICE, between INFO and WARNING.  `livestack run` shows them (with -q too);
# `livestack demo` and `stack` print their own summaries instead of a "WARNING" line for a good night.
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")
