"""Shares of a gateway histogram between two scrapes of its /metrics, for
scripts/bench and scripts/half-peak-timeline (which import it)."""
import re


def share_under(before, after, histogram, bound):
    """Share of the observations of `histogram` (summed over its label
    sets) made between the scrapes in files `before` and `after` that were
    at or below `bound` seconds (a bucket bound as written, e.g. "0.02")."""
    def read(name):
        within = total = 0.0
        for line in open(name):
            m = re.match(histogram + r'_bucket\{(.*)\} (\S+)$', line)
            if m and re.search(r'le="([^"]+)"', m.group(1)).group(1) == bound:
                within += float(m.group(2))
            m = re.match(histogram + r'_count(\{.*\})? (\S+)$', line)
            if m:
                total += float(m.group(2))
        return within, total
    (w0, t0), (w1, t1) = read(before), read(after)
    return (w1 - w0) / max(t1 - t0, 1.0)
