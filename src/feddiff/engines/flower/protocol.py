"""Names both sides of the Flower engine agree on (no heavy imports: the ClientApp loads this first)."""

TRAIN, QUERY, HELLO = "train.feddiff", "query.feddiff", "query.hello"  # Flower message types
ROLLBACK = "query.rollback"  # a round that did not count: the node restores its record from before it
SECTION = "feddiff"  # the RecordDict entry that carries our frame
STATE = "feddiff-record"  # the Context.state entry that holds the client's record
DONE_FILE = "flower-run.json"  # written into the run folder when the ServerApp finished every round
