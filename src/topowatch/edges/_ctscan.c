/* SPDX-License-Identifier: GPL-2.0-or-later */
/* topowatch.edges._ctscan: the compiled fast path of a ctnetlink dump scan.
 *
 * What it decides: for one received datagram, which messages it reads itself
 * (IPCTNL_MSG_CT_NEW of the canonical shape the kernel sends: both tuples as
 * IP{src,dst} + PROTO{num,sport,dport} or, for ICMP/ICMPv6, PROTO{num,id,
 * type,code}; 4-byte status/timeout/mark/id, a 2-byte zone; other attributes
 * skipped) and, with a settle cache, which of
 * those are certainly healthy by the precompiled checks of their flow key
 * (``core.decide.Decider.raw_program``) and need no Python at all.
 *
 * What it must never do: judge an entry in any other way than the Python
 * ``Decider.add_raw`` would, or read a message any other way than
 * ``ctcodec.decode_entry``. Everything it does not recognise exactly
 * (directional zones, repeated or odd-sized attributes, a truncated message,
 * a family that does not match the address size) goes to the parser's
 * reference decode (``parser._generic``), so the result can only agree with
 * the pure-Python path; tests/edges/test_ctscan.py checks that it does.
 * ``feed`` performs no I/O and keeps no state between calls except what the
 * caller passes in (the settle cache). ``recv_burst`` is the one I/O function:
 * it receives many datagrams of a dump without holding the GIL, so that the
 * kernel fills the next part of the dump (it does so inside recvmsg) while
 * Python judges the last one; it only reads message headers, to see the end.
 *
 * ``iptables_line`` (no ctnetlink: it lives here to be built the same way) is the iptables reader's
 * line regex (``edges.iptables._FAST_LINE``) read in C; it must take exactly the lines the regex
 * takes, with the same groups, and keeps no state (see its own comment below).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

#define NLMSG_ERROR 2
#define NLMSG_DONE 3
#define NLMSG_OVERRUN 4
#define NLM_F_DUMP_INTR 0x10
#define IPCTNL_MSG_CT_NEW (1 << 8)
#define NLA_TYPE_MASK 0x3FFF

#define CTA_TUPLE_ORIG 1
#define CTA_TUPLE_REPLY 2
#define CTA_STATUS 3
#define CTA_TIMEOUT 7
#define CTA_MARK 8
#define CTA_ID 12
#define CTA_ZONE 18
#define CTA_TUPLE_IP 1
#define CTA_TUPLE_PROTO 2
#define CTA_IP_V4_SRC 1
#define CTA_IP_V4_DST 2
#define CTA_IP_V6_SRC 3
#define CTA_IP_V6_DST 4
#define CTA_PROTO_NUM 1
#define CTA_PROTO_SRC_PORT 2
#define CTA_PROTO_DST_PORT 3
#define CTA_PROTO_ICMP_ID 4 /* then _TYPE 5, _CODE 6 */
#define CTA_PROTO_ICMPV6_ID 7 /* then _TYPE 8, _CODE 9 */

#define AF_INET_ 2
#define AF_INET6_ 10
#define IPPROTO_ICMP_ 1
#define IPPROTO_ICMPV6_ 58
#define IPS_SEEN_REPLY 2u
#define IPS_SRC_NAT_DONE (1u << 7)
#define IPS_DST_NAT_DONE (1u << 8)

/* Program layout (core.decide.raw_program): b"R" refused; or b"P" + dnat side + snat side,
 * each side: mode byte (0 unknown: always judge, 1 no binding: healthy, 2 ranges), for mode 2
 * a count byte and per range: flags (1 address range, 2 port range, 4 port kept), lo[16], hi[16] big-endian,
 * port_lo[2], port_hi[2] big-endian. */
#define RANGE_BYTES 37

#define ALIGN4(n) (((n) + 3u) & ~3u)

static inline uint16_t host16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t host32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

typedef struct {
    const uint8_t *src, *dst;
    uint16_t sport, dport;
    uint8_t proto;
} tuple_t;

typedef struct {
    uint8_t family, alen;
    tuple_t orig, reply;
    uint32_t status, mark, id, timeout;
    uint16_t zone;
} entry_t;

/* Reads one attribute header at p (limit: end of the enclosing attribute); -1 if it overruns. */
static inline int attr(const uint8_t *p, const uint8_t *limit, unsigned *len, unsigned *type) {
    if (p + 4 > limit) return -1;
    *len = host16(p);
    *type = host16(p + 2) & NLA_TYPE_MASK;
    if (*len < 4 || p + *len > limit) return -1;
    return 0;
}

/* A tuple nest's payload [p, end): exactly IP{src, dst} then PROTO{num, sport, dport}. */
static int parse_tuple(const uint8_t *p, const uint8_t *end, uint8_t family, tuple_t *t) {
    unsigned len, type, ilen, itype;
    unsigned want = family == AF_INET_ ? 8 : 20;
    unsigned src_type = family == AF_INET_ ? CTA_IP_V4_SRC : CTA_IP_V6_SRC;
    const uint8_t *q, *aend;
    if (attr(p, end, &len, &type) || type != CTA_TUPLE_IP) return -1;
    aend = p + len;
    q = p + 4;
    if (attr(q, aend, &ilen, &itype) || itype != src_type || ilen != want) return -1;
    t->src = q + 4;
    q += ALIGN4(ilen);
    if (attr(q, aend, &ilen, &itype) || itype != src_type + 1 || ilen != want) return -1;
    t->dst = q + 4;
    q += ALIGN4(ilen);
    if (q != aend) return -1;
    p += ALIGN4(len);
    if (attr(p, end, &len, &type) || type != CTA_TUPLE_PROTO) return -1;
    aend = p + len;
    q = p + 4;
    if (attr(q, aend, &ilen, &itype) || itype != CTA_PROTO_NUM || ilen != 5) return -1;
    t->proto = q[4];
    q += 8;
    if (t->proto == IPPROTO_ICMP_ || t->proto == IPPROTO_ICMPV6_) {
        /* id, type, code (icmp_tuple_to_nlattr); CtTuple's convention: sport id, dport type << 8 | code */
        unsigned base = t->proto == IPPROTO_ICMP_ ? CTA_PROTO_ICMP_ID : CTA_PROTO_ICMPV6_ID;
        uint8_t type;
        if (attr(q, aend, &ilen, &itype) || itype != base || ilen != 6) return -1;
        t->sport = be16(q + 4);
        q += 8;
        if (attr(q, aend, &ilen, &itype) || itype != base + 1 || ilen != 5) return -1;
        type = q[4];
        q += 8;
        if (attr(q, aend, &ilen, &itype) || itype != base + 2 || ilen != 5) return -1;
        t->dport = (uint16_t)(type << 8 | q[4]);
        q += 8;
    } else {
        if (attr(q, aend, &ilen, &itype) || itype != CTA_PROTO_SRC_PORT || ilen != 6) return -1;
        t->sport = be16(q + 4);
        q += 8;
        if (attr(q, aend, &ilen, &itype) || itype != CTA_PROTO_DST_PORT || ilen != 6) return -1;
        t->dport = be16(q + 4);
        q += 8;
    }
    if (q != aend) return -1;
    p += ALIGN4(len);
    return p == end ? 0 : -1;
}

/* The attributes of one CT_NEW message after its nfgenmsg: 0 when read, -1 for the reference path. */
static int parse_entry(const uint8_t *msg, unsigned mlen, entry_t *e) {
    const uint8_t *p = msg + 20, *end = msg + mlen;
    unsigned len, type, seen = 0;
    e->family = msg[16];
    if (e->family == AF_INET_) e->alen = 4;
    else if (e->family == AF_INET6_) e->alen = 16;
    else return -1;
    e->mark = e->id = e->timeout = 0;
    e->zone = 0;
    while (p < end) {
        unsigned bit;
        if (attr(p, end, &len, &type)) return -1;
        bit = type < 32 ? 1u << type : 0;
        if (bit & seen) return -1; /* a repeated attribute: let the reference decide */
        seen |= bit;
        switch (type) {
        case CTA_TUPLE_ORIG:
            if (parse_tuple(p + 4, p + len, e->family, &e->orig)) return -1;
            break;
        case CTA_TUPLE_REPLY:
            if (parse_tuple(p + 4, p + len, e->family, &e->reply)) return -1;
            break;
        case CTA_STATUS:
        case CTA_TIMEOUT:
        case CTA_MARK:
        case CTA_ID:
            if (len != 8) return -1;
            if (type == CTA_STATUS) e->status = be32(p + 4);
            else if (type == CTA_TIMEOUT) e->timeout = be32(p + 4);
            else if (type == CTA_MARK) e->mark = be32(p + 4);
            else e->id = be32(p + 4);
            break;
        case CTA_ZONE:
            if (len != 6) return -1;
            e->zone = be16(p + 4);
            break;
        default:
            break; /* not read by the decision: skipped, as decode_entry does */
        }
        p += ALIGN4(len);
    }
    if (p != end) return -1;
    if (!(seen & (1u << CTA_TUPLE_ORIG)) || !(seen & (1u << CTA_TUPLE_REPLY)) || !(seen & (1u << CTA_STATUS)))
        return -1;
    if (e->orig.proto != e->reply.proto) return -1;
    return 0;
}

/* core.decide.RawEntry of a read entry. */
static PyObject *raw_tuple(const entry_t *e) {
    return Py_BuildValue(
        "(BBy#y#HHy#y#HHkHkkk)", e->family, e->orig.proto,
        (const char *)e->orig.src, (Py_ssize_t)e->alen, (const char *)e->orig.dst, (Py_ssize_t)e->alen,
        e->orig.sport, e->orig.dport,
        (const char *)e->reply.src, (Py_ssize_t)e->alen, (const char *)e->reply.dst, (Py_ssize_t)e->alen,
        e->reply.sport, e->reply.dport,
        (unsigned long)e->status, e->zone, (unsigned long)e->mark, (unsigned long)e->id,
        (unsigned long)e->timeout);
}

/* The settle-cache key of an entry: every field of core.decide's raw key, packed. */
static PyObject *raw_key(const entry_t *e, int sport_matters) {
    uint8_t k[48];
    unsigned n = 0;
    k[n++] = (uint8_t)(e->zone >> 8); k[n++] = (uint8_t)e->zone;
    k[n++] = (uint8_t)(e->mark >> 24); k[n++] = (uint8_t)(e->mark >> 16);
    k[n++] = (uint8_t)(e->mark >> 8); k[n++] = (uint8_t)e->mark;
    k[n++] = e->orig.proto;
    k[n++] = e->family;
    k[n++] = (uint8_t)(e->status & IPS_SEEN_REPLY);
    k[n++] = (uint8_t)(e->orig.dport >> 8); k[n++] = (uint8_t)e->orig.dport;
    if (sport_matters) {
        k[n++] = (uint8_t)(e->orig.sport >> 8); k[n++] = (uint8_t)e->orig.sport;
    }
    memcpy(k + n, e->orig.src, e->alen); n += e->alen;
    memcpy(k + n, e->orig.dst, e->alen); n += e->alen;
    return PyBytes_FromStringAndSize((const char *)k, n);
}

/* Flow classes (core.classify.Classifier.packed): per field, sorted interval starts and each
 * interval's class; the key is the class of every field, as Classifier.key computes it. Layout,
 * native byte order: u32 n4, n6, np, nm, sport_matters; v4 starts (u32 host order) and classes
 * (u32); v6 starts (16 bytes big-endian) and classes; port starts and classes; nm (value, mask)
 * u32 pairs of marks. */
typedef struct {
    uint32_t n4, n6, np, nm, sport_matters;
    const uint8_t *v4, *v4c, *v6, *v6c, *ports, *portsc, *marks;
} classes_t;

static int classes_read(const uint8_t *p, Py_ssize_t n, classes_t *c) {
    size_t need;
    if (n < 20) return -1;
    memcpy(&c->n4, p, 4); memcpy(&c->n6, p + 4, 4); memcpy(&c->np, p + 8, 4);
    memcpy(&c->nm, p + 12, 4); memcpy(&c->sport_matters, p + 16, 4);
    if (c->n4 < 1 || c->n6 < 1 || c->np < 1 || c->nm > 63) return -1;
    need = 20 + (size_t)c->n4 * 8 + (size_t)c->n6 * 20 + (size_t)c->np * 8 + (size_t)c->nm * 8;
    if ((size_t)n != need) return -1;
    c->v4 = p + 20;
    c->v4c = c->v4 + (size_t)c->n4 * 4;
    c->v6 = c->v4c + (size_t)c->n4 * 4;
    c->v6c = c->v6 + (size_t)c->n6 * 16;
    c->ports = c->v6c + (size_t)c->n6 * 4;
    c->portsc = c->ports + (size_t)c->np * 4;
    c->marks = c->portsc + (size_t)c->np * 4;
    return 0;
}

/* The class of value v among n sorted u32 starts (the last start <= v; starts[0] is 0). */
static uint32_t class_u32(const uint8_t *starts, const uint8_t *classes, uint32_t n, uint32_t v) {
    /* The answer lies in [i, i + len); halved without a branch to mispredict (a conditional move). */
    uint32_t i = 0, len = n;
    while (len > 1) {
        uint32_t half = len / 2, s;
        memcpy(&s, starts + (size_t)(i + half) * 4, 4);
        i = s <= v ? i + half : i;
        len -= half;
    }
    uint32_t c;
    memcpy(&c, classes + (size_t)i * 4, 4);
    return c;
}
static uint32_t class_v6(const uint8_t *starts, const uint8_t *classes, uint32_t n, const uint8_t *v) {
    uint32_t lo = 0, hi = n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (memcmp(starts + (size_t)mid * 16, v, 16) <= 0) lo = mid + 1; else hi = mid;
    }
    uint32_t c;
    memcpy(&c, classes + (size_t)(lo ? lo - 1 : 0) * 4, 4);
    return c;
}

/* The settle-cache key of an entry by its classes (see Classifier.key), written to k[32]: its length. */
static unsigned class_key_into(const entry_t *e, const classes_t *c, uint8_t *k) {
    unsigned n = 0;
    uint64_t bits = e->mark == 0 ? 1 : 0;
    uint32_t src, dst, v;
    for (uint32_t i = 0; i < c->nm; i++) {
        uint32_t value, mask;
        memcpy(&value, c->marks + (size_t)i * 8, 4);
        memcpy(&mask, c->marks + (size_t)i * 8 + 4, 4);
        if ((e->mark & mask) == value) bits |= (uint64_t)1 << (i + 1);
    }
    if (e->family == AF_INET_) {
        src = class_u32(c->v4, c->v4c, c->n4, be32(e->orig.src));
        dst = class_u32(c->v4, c->v4c, c->n4, be32(e->orig.dst));
    } else {
        src = class_v6(c->v6, c->v6c, c->n6, e->orig.src);
        dst = class_v6(c->v6, c->v6c, c->n6, e->orig.dst);
    }
    k[n++] = e->family;
    k[n++] = e->orig.proto;
    k[n++] = (uint8_t)(e->zone >> 8); k[n++] = (uint8_t)e->zone;
    k[n++] = (uint8_t)(e->status & IPS_SEEN_REPLY);
    memcpy(k + n, &bits, 8); n += 8;
    memcpy(k + n, &src, 4); n += 4;
    memcpy(k + n, &dst, 4); n += 4;
    v = class_u32(c->ports, c->portsc, c->np, e->orig.dport);
    memcpy(k + n, &v, 4); n += 4;
    if (c->sport_matters) {
        v = class_u32(c->ports, c->portsc, c->np, e->orig.sport);
        memcpy(k + n, &v, 4); n += 4;
    }
    return n;
}

/* A per-call memo of the settle cache by class key: a class's program found once in the cache
 * (a dict keyed by bytes) is found again without building a key object or hashing it in
 * Python. It holds a reference to each program it keeps and lives for one ``feed`` call, so it
 * never outlives a change of the cache (which only ever adds a key's program once). */
#define MEMO_SLOTS 512 /* a power of 2; filled at most half */
typedef struct {
    uint8_t n;
    uint8_t key[32];
    PyObject *prog;
} memo_slot_t;

/* Keys are compared and hashed as four 8-byte words: k is zero beyond its length n. */
static uint32_t memo_hash(const uint8_t *k, unsigned n) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ n, w;
    for (unsigned i = 0; i < 32; i += 8) {
        memcpy(&w, k + i, 8);
        h = (h ^ w) * 0xFF51AFD7ED558CCDull;
        h ^= h >> 32;
    }
    return (uint32_t)h;
}

static int memo_same(const uint8_t *a, const uint8_t *b) {
    uint64_t x[4], y[4];
    memcpy(x, a, 32);
    memcpy(y, b, 32);
    return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3])) == 0;
}

/* The slot of key k (32 bytes, zero beyond n): the one holding it, or the empty one where it goes. */
static memo_slot_t *memo_find(memo_slot_t *memo, const uint8_t *k, unsigned n) {
    uint32_t i = memo_hash(k, n) & (MEMO_SLOTS - 1);
    for (;;) {
        memo_slot_t *s = &memo[i];
        if (s->prog == NULL || (s->n == n && memo_same(s->key, k))) return s;
        i = (i + 1) & (MEMO_SLOTS - 1);
    }
}

static void memo_free(memo_slot_t *memo) {
    if (memo == NULL) return;
    for (unsigned i = 0; i < MEMO_SLOTS; i++) Py_XDECREF(memo[i].prog);
    PyMem_Free(memo);
}

/* One side of a program at *pp: 1 healthy, 0 must be judged, -1 malformed program. The rule
 * is core/admission.py's; tests/edges/test_ctscan.py runs this over its table of cases. Whether
 * the side's NAT hook ran does not matter: one that never ran is a null binding, read from the
 * tuples. */
static int side_admits(const uint8_t **pp, const uint8_t *pend,
                       const uint8_t *original, const uint8_t *translated, unsigned alen,
                       uint16_t original_port, uint16_t port) {
    const uint8_t *p = *pp;
    uint8_t mode, count, i;
    int admitted = 0;
    uint8_t value[16];
    if (p >= pend) return -1;
    mode = *p++;
    if (mode == 0 || mode == 1) {
        *pp = p;
        return mode == 1;
    }
    if (mode != 2 || p >= pend) return -1;
    count = *p++;
    if (p + (size_t)count * RANGE_BYTES > pend) return -1;
    *pp = p + (size_t)count * RANGE_BYTES;
    memset(value, 0, 16);
    memcpy(value + 16 - alen, translated, alen);
    for (i = 0; i < count && !admitted; i++, p += RANGE_BYTES) {
        uint8_t flags = p[0];
        if (flags & 1) {
            if (memcmp(p + 1, value, 16) > 0 || memcmp(value, p + 17, 16) > 0) continue;
        } else if (memcmp(original, translated, alen) != 0) {
            continue;
        }
        if (flags & 2) {
            if (port < be16(p + 33) || port > be16(p + 35)) continue;
        } else if ((flags & 4) && port != original_port) {
            continue;  /* a destination port is never changed without a range */
        }
        admitted = 1;
    }
    return admitted;
}

/* A stale entry settled here (``core.decide.STALE_RECORD``, native byte order, 100 bytes):
 * what ``Decider`` needs to build its Decision later and what a re-check and a delete send. */
typedef struct {
    uint8_t family, proto, side, pad;
    uint16_t zone, pad2;
    uint32_t status, mark, id, timeout, slot;
    uint16_t osport, odport, rsport, rdport;
    uint8_t osrc[16], odst[16], rsrc[16], rdst[16];
} record_t;

#define VERDICT_JUDGE 0   /* the reasoned judgement in Python decides */
#define VERDICT_HEALTHY 1 /* every side admitted */
#define VERDICT_DNAT 2    /* stale: its destination binding is outside every predicted one */
#define VERDICT_SNAT 3    /* stale: its source binding is */
#define VERDICT_NONE 4    /* no side says anything (no binding readable, or nothing changed) */
#define VERDICT_UNDECIDED_DNAT 5 /* undecided: destination NAT unpredictable, the class's verdict */
#define VERDICT_UNDECIDED_SNAT 6
#define VERDICT_ALTERNATIVES 7 /* stale: every way the entry may have come refuses it (``*side``) */

#define SIDE_OK 0     /* admitted: nothing to say */
#define SIDE_FAIL 1   /* stale if the entry's binding on that side can be read */
#define SIDE_UNDEC 2  /* undecided if it can */
#define SIDE_NONE 3   /* unpredictable, but the class's verdict is "nothing" */
#define SIDE_JUDGE 4  /* unpredictable without a verdict: Python */
#define SIDE_BAD 5    /* malformed program */

/* One side of a program at *pp (see ``core.decide``: modes 0 unknown, 1 no binding, 2 ranges, and
 * with a slot 3: unknown with the class's verdict byte, 0 nothing, 1 stale, 2 undecided). */
static int side_outcome(const uint8_t **pp, const uint8_t *pend, const uint8_t *original,
                        const uint8_t *translated, unsigned alen, uint16_t original_port, uint16_t port) {
    const uint8_t *p = *pp;
    int r;
    if (p >= pend) return SIDE_BAD;
    if (*p == 3) {
        if (pend - p < 2) return SIDE_BAD;
        *pp = p + 2;
        return p[1] == 0 ? SIDE_NONE : p[1] == 1 ? SIDE_FAIL : p[1] == 2 ? SIDE_UNDEC : SIDE_BAD;
    }
    if (*p == 0) {
        *pp = p + 1;
        return SIDE_JUDGE;
    }
    r = side_admits(pp, pend, original, translated, alen, original_port, port);
    return r < 0 ? SIDE_BAD : r ? SIDE_OK : SIDE_FAIL;
}

/* A program's alternatives block (``core.decide.Decider.raw_program``), at p after b"A": the union
 * prediction's DNAT and SNAT sides, a count byte and each live alternative's DNAT and SNAT sides
 * (modes 0-2), then b"S" + u32 slot. An entry the P checks did not settle is stale only where every
 * alternative refuses it a side whose binding can be read (``Decider._judge_alternatives``); any
 * other goes to Python. The stale record's side (``_joint_stale``): 0 or 1 where the union refuses
 * that side (DNAT first), else 2 (DNAT) or 3 (SNAT), the side most alternatives refuse first. */
static int alternatives(const entry_t *e, const uint8_t *p, const uint8_t *pend, int dread, int sread,
                        uint32_t *slot, int *side) {
    int ud, us, ad, as, dref = 0, sref = 0;
    unsigned count, i;
    ud = side_outcome(&p, pend, e->orig.dst, e->reply.src, e->alen, e->orig.dport, e->reply.sport);
    if (ud == SIDE_BAD) return VERDICT_JUDGE;
    us = side_outcome(&p, pend, e->orig.src, e->reply.dst, e->alen, e->orig.sport, e->reply.dport);
    if (us == SIDE_BAD || p >= pend) return VERDICT_JUDGE;
    count = *p++;
    for (i = 0; i < count; i++) {
        ad = side_outcome(&p, pend, e->orig.dst, e->reply.src, e->alen, e->orig.dport, e->reply.sport);
        if (ad == SIDE_BAD) return VERDICT_JUDGE;
        as = side_outcome(&p, pend, e->orig.src, e->reply.dst, e->alen, e->orig.sport, e->reply.dport);
        if (as == SIDE_BAD) return VERDICT_JUDGE;
        if (ad == SIDE_FAIL && dread) dref++;
        else if (as == SIDE_FAIL && sread) sref++;
        else return VERDICT_JUDGE; /* this way may give it its bindings */
    }
    if (pend - p != 5 || p[0] != 'S') return VERDICT_JUDGE;
    memcpy(slot, p + 1, 4);
    if (count == 0) return VERDICT_NONE; /* dropped whichever way it comes */
    if (ud == SIDE_FAIL && dread) *side = 0;
    else if (us == SIDE_FAIL && sread) *side = 1;
    else *side = dref >= sref ? 2 : 3;
    return VERDICT_ALTERNATIVES;
}

/* The verdict of a program on an entry, as ``Decider._judge`` reaches it: DNAT first, a side
 * that fails is stale and one that is undecided is remembered, unless the side's binding cannot
 * be read (tuples differ, its NAT hook never ran: ``_side`` skips it). A side without a verdict
 * (mode 0), a program without a slot (b"S" + u32 after the sides) and ICMP entries go to Python.
 * ``*slot`` receives the program's slot. */
static int verdict(const entry_t *e, const uint8_t *p, Py_ssize_t n, uint32_t *slot, int *side) {
    const uint8_t *pend = p + n;
    int icmp = e->orig.proto == IPPROTO_ICMP_ || e->orig.proto == IPPROTO_ICMPV6_;
    int d, s, dread, sread, undecided_dnat = 0;
    if (n < 1 || *p != 'P') return VERDICT_JUDGE;
    p++;
    d = side_outcome(&p, pend, e->orig.dst, e->reply.src, e->alen, e->orig.dport,
                     icmp ? e->orig.dport : e->reply.sport);
    if (d == SIDE_BAD) return VERDICT_JUDGE;
    s = side_outcome(&p, pend, e->orig.src, e->reply.dst, e->alen, e->orig.sport,
                     icmp ? e->orig.sport : e->reply.dport);
    if (s == SIDE_BAD) return VERDICT_JUDGE;
    if (d == SIDE_OK && s == SIDE_OK) return VERDICT_HEALTHY;
    if (icmp) return VERDICT_JUDGE;
    /* Whether each side's binding can be read: tuples kept, or its NAT hook ran. */
    dread = (memcmp(e->reply.src, e->orig.dst, e->alen) == 0 && e->reply.sport == e->orig.dport) ||
            (e->status & IPS_DST_NAT_DONE);
    sread = (memcmp(e->reply.dst, e->orig.src, e->alen) == 0 && e->reply.dport == e->orig.sport) ||
            (e->status & IPS_SRC_NAT_DONE);
    if (p < pend && *p == 'A') return alternatives(e, p + 1, pend, dread, sread, slot, side);
    if (d == SIDE_JUDGE || s == SIDE_JUDGE || pend - p != 5 || p[0] != 'S') return VERDICT_JUDGE;
    memcpy(slot, p + 1, 4);
    if (d == SIDE_FAIL || d == SIDE_UNDEC) {
        if (dread && d == SIDE_FAIL) return VERDICT_DNAT;
        undecided_dnat = dread;
    }
    if (s == SIDE_FAIL || s == SIDE_UNDEC) {
        if (sread && s == SIDE_FAIL) return VERDICT_SNAT;
        if (undecided_dnat) return VERDICT_UNDECIDED_DNAT;
        if (sread) return VERDICT_UNDECIDED_SNAT;
    }
    return undecided_dnat ? VERDICT_UNDECIDED_DNAT : VERDICT_NONE;
}

static int record(PyObject *out, const entry_t *e, int side, uint32_t slot) {
    record_t r;
    Py_ssize_t at = PyByteArray_GET_SIZE(out);
    memset(&r, 0, sizeof r);
    r.family = e->family; r.proto = e->orig.proto; r.side = (uint8_t)side;
    r.zone = e->zone; r.status = e->status; r.mark = e->mark; r.id = e->id; r.timeout = e->timeout;
    r.slot = slot;
    r.osport = e->orig.sport; r.odport = e->orig.dport; r.rsport = e->reply.sport; r.rdport = e->reply.dport;
    memcpy(r.osrc, e->orig.src, e->alen); memcpy(r.odst, e->orig.dst, e->alen);
    memcpy(r.rsrc, e->reply.src, e->alen); memcpy(r.rdst, e->reply.dst, e->alen);
    if (PyByteArray_Resize(out, at + (Py_ssize_t)sizeof r) < 0) return -1;
    memcpy(PyByteArray_AS_STRING(out) + at, &r, sizeof r);
    return 0;
}

static int call1(PyObject *fn, PyObject *arg) {
    PyObject *r = PyObject_CallOneArg(fn, arg);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

static int generic(PyObject *parser, PyObject *data, Py_ssize_t pos, Py_ssize_t end) {
    PyObject *r = PyObject_CallMethod(parser, "_generic", "Onn", data, pos, end);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

static int error(PyObject *parser, const char *why) {
    PyObject *r = PyObject_CallMethod(parser, "_error", "s", why);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

PyDoc_STRVAR(feed_doc,
"feed(parser, data, n, seq, skip_mask, sink, cache, program, judge, sport_matters[, tables[, records[, undecided]]])\n"
"-> (messages, skipped, stale, done, interrupted, errno, examined, eligible)\n\n"
"Walk one datagram as ``ctcodec.DumpParser.feed`` does with a sink. Entries it reads go to\n"
"``sink`` as raw entries, unless ``cache`` (a dict, or None) holds a program for their key\n"
"that settles them as healthy (counted in examined/eligible) or refused (examined only);\n"
"an entry whose program ran and failed goes to ``judge``. A key not in the cache: the\n"
"entry goes to ``sink``, then ``program(raw)`` is stored for it (None: always ``sink``).\n"
"With ``tables`` (``Classifier.packed``) the cache is keyed by the entry's flow class instead\n"
"of its flow key. With ``records`` (a bytearray), an entry that a program with a slot finds\n"
"stale (see ``verdict``) is appended to it as a ``core.decide.STALE_RECORD`` instead of going\n"
"to ``judge``; one it finds undecided, to ``undecided``. Everything else goes to\n"
"``parser._generic`` / ``parser._error``.");

static PyObject *feed(PyObject *self, PyObject *args) {
    PyObject *parser, *data, *sink, *cache, *program, *judge, *tables = Py_None, *records = Py_None;
    PyObject *undecided = Py_None;
    Py_ssize_t n;
    unsigned long seq, skip_mask;
    int sport_matters;
    Py_buffer buf;
    classes_t classes;
    memset(&classes, 0, sizeof classes);
    int by_class = 0;
    memo_slot_t *memo = NULL;
    unsigned memo_used = 0;
    long messages = 0, skipped = 0, stale = 0, examined = 0, eligible = 0;
    int done = 0, interrupted = 0, err_no = 0;
    Py_ssize_t pos = 0;
    if (!PyArg_ParseTuple(args, "OOnkkOOOOp|OOO", &parser, &data, &n, &seq, &skip_mask, &sink, &cache, &program,
                          &judge, &sport_matters, &tables, &records, &undecided))
        return NULL;
    if ((records != Py_None && !PyByteArray_Check(records)) || (undecided != Py_None && !PyByteArray_Check(undecided))) {
        PyErr_SetString(PyExc_TypeError, "records must be a bytearray or None");
        return NULL;
    }
    if (tables != Py_None) {
        if (!PyBytes_Check(tables) ||
            classes_read((const uint8_t *)PyBytes_AS_STRING(tables), PyBytes_GET_SIZE(tables), &classes)) {
            PyErr_SetString(PyExc_ValueError, "malformed class tables");
            return NULL;
        }
        by_class = 1;
    }
    if (cache != Py_None && !PyDict_Check(cache)) {
        PyErr_SetString(PyExc_TypeError, "cache must be a dict or None");
        return NULL;
    }
    if (PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE) < 0) return NULL;
    if (n < 0 || n > buf.len) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "n outside the buffer");
        return NULL;
    }
    const uint8_t *base = (const uint8_t *)buf.buf;
    if (by_class && cache != Py_None) {
        memo = PyMem_Calloc(MEMO_SLOTS, sizeof(memo_slot_t));
        if (memo == NULL) {
            PyBuffer_Release(&buf);
            PyErr_NoMemory();
            return NULL;
        }
    }
    while (pos + 16 <= n) {
        const uint8_t *m = base + pos;
        uint32_t mlen = host32(m);
        uint16_t mtype = host16(m + 4), mflags = host16(m + 6);
        uint32_t mseq = host32(m + 8);
        if (mlen < 16 || (Py_ssize_t)mlen > n - pos) {
            char why[96];
            snprintf(why, sizeof why, "netlink message of length %u at %zd overruns %zd", mlen, pos, n);
            if (error(parser, why)) goto fail;
            goto out;
        }
        if (mtype == IPCTNL_MSG_CT_NEW && mseq == seq) {
            entry_t e;
            messages++;
            if (mflags & NLM_F_DUMP_INTR) interrupted = 1;
            if (mlen < 20 || parse_entry(m, mlen, &e)) {
                if (generic(parser, data, pos, pos + mlen)) goto fail;
            } else if (e.status & skip_mask) {
                skipped++;
            } else if (cache == Py_None) {
                PyObject *raw = raw_tuple(&e);
                if (raw == NULL) goto fail;
                int r = call1(sink, raw);
                Py_DECREF(raw);
                if (r) goto fail;
            } else {
                /* key stays NULL where the memo had the program: only learning a program needs it. */
                PyObject *key = NULL, *prog = NULL; /* prog borrowed (from the cache or the memo) */
                if (memo != NULL) {
                    uint8_t k[32] = {0};
                    unsigned kn = class_key_into(&e, &classes, k);
                    memo_slot_t *slot = memo_find(memo, k, kn);
                    if (slot->prog != NULL) {
                        prog = slot->prog;
                    } else {
                        key = PyBytes_FromStringAndSize((const char *)k, kn);
                        if (key == NULL) goto fail;
                        prog = PyDict_GetItemWithError(cache, key);
                        if (prog == NULL && PyErr_Occurred()) { Py_XDECREF(key); goto fail; }
                        if (prog != NULL && PyBytes_Check(prog) && memo_used < MEMO_SLOTS / 2) {
                            Py_INCREF(prog);
                            slot->prog = prog;
                            slot->n = (uint8_t)kn;
                            memcpy(slot->key, k, 32);
                            memo_used++;
                        }
                    }
                } else { /* no classes: keyed by flow (the memo is for class keys) */
                    key = raw_key(&e, sport_matters);
                    if (key == NULL) goto fail;
                    prog = PyDict_GetItemWithError(cache, key);
                    if (prog == NULL && PyErr_Occurred()) { Py_XDECREF(key); goto fail; }
                }
                if (prog != NULL && PyBytes_Check(prog)) {
                    const uint8_t *pp = (const uint8_t *)PyBytes_AS_STRING(prog);
                    Py_ssize_t pn = PyBytes_GET_SIZE(prog);
                    if (pn == 1 && pp[0] == 'R') {
                        examined++;
                        Py_XDECREF(key);
                        goto next;
                    }
                    uint32_t slot = 0;
                    int side = 0;
                    int v = verdict(&e, pp, pn, &slot, &side);
                    int is_stale = v == VERDICT_DNAT || v == VERDICT_SNAT || v == VERDICT_ALTERNATIVES;
                    int is_undecided = v == VERDICT_UNDECIDED_DNAT || v == VERDICT_UNDECIDED_SNAT;
                    if (v == VERDICT_HEALTHY || v == VERDICT_NONE || (is_stale && records != Py_None) ||
                        (is_undecided && undecided != Py_None)) {
                        if (is_stale && record(records, &e, v == VERDICT_ALTERNATIVES ? side : v == VERDICT_DNAT ? 0 : 1, slot)) {
                            Py_XDECREF(key);
                            goto fail;
                        }
                        if (is_undecided && record(undecided, &e, v == VERDICT_UNDECIDED_DNAT ? 0 : 1, slot)) {
                            Py_XDECREF(key);
                            goto fail;
                        }
                        examined++;
                        eligible++;
                        Py_XDECREF(key);
                        goto next;
                    }
                }
                PyObject *raw = raw_tuple(&e);
                if (raw == NULL) { Py_XDECREF(key); goto fail; }
                /* A program that ran and failed: straight to the judgement; else the whole add. */
                PyObject *to = prog != NULL && PyBytes_Check(prog) ? judge : sink;
                if (call1(to, raw)) { Py_DECREF(raw); Py_XDECREF(key); goto fail; }
                if (prog == NULL) {
                    PyObject *learned = PyObject_CallOneArg(program, raw);
                    if (learned == NULL || PyDict_SetItem(cache, key, learned) < 0) {
                        Py_XDECREF(learned); Py_DECREF(raw); Py_XDECREF(key); goto fail;
                    }
                    Py_DECREF(learned);
                }
                Py_DECREF(raw);
                Py_XDECREF(key);
            }
        } else if (mseq != seq) {
            stale++;
        } else {
            if (mflags & NLM_F_DUMP_INTR) interrupted = 1;
            if (mtype == NLMSG_DONE) {
                done = 1;
            } else if (mtype == NLMSG_ERROR) {
                if (mlen < 20) {
                    if (error(parser, "short NLMSG_ERROR")) goto fail;
                } else {
                    int32_t e;
                    memcpy(&e, m + 16, 4);
                    if (e) err_no = -e;
                    done = 1;
                }
            } else if (mtype == NLMSG_OVERRUN) {
                if (error(parser, "NLMSG_OVERRUN")) goto fail;
            }
        }
    next:
        pos += ALIGN4(mlen);
    }
    if (pos < n) {
        char why[64];
        snprintf(why, sizeof why, "%zd trailing bytes after the last message", n - pos);
        if (error(parser, why)) goto fail;
    }
out:
    memo_free(memo);
    PyBuffer_Release(&buf);
    return Py_BuildValue("(llliiill)", messages, skipped, stale, done, interrupted, err_no, examined, eligible);
fail:
    memo_free(memo);
    PyBuffer_Release(&buf);
    return NULL;
}

/* 1 when the datagram [p, p+n) holds the NLMSG_DONE or NLMSG_ERROR that ends dump ``seq``. */
static int ends_dump(const uint8_t *p, Py_ssize_t n, uint32_t seq) {
    Py_ssize_t pos = 0;
    while (pos + 16 <= n) {
        uint32_t mlen = host32(p + pos);
        uint16_t mtype = host16(p + pos + 4);
        if (mlen < 16 || (Py_ssize_t)mlen > n - pos) return 0; /* the parser will say what is wrong */
        if (host32(p + pos + 8) == seq && (mtype == NLMSG_DONE || mtype == NLMSG_ERROR)) return 1;
        pos += ALIGN4(mlen);
    }
    return 0;
}

PyDoc_STRVAR(recv_burst_doc,
"recv_burst(fd, size, room, seq, timeout_ms) -> (data, datagrams, ended, errno)\n\n"
"Receive datagrams of dump ``seq`` from the non-blocking socket ``fd`` into one bytes object\n"
"of at most ``size`` bytes, without the GIL: until the datagram that ends the dump\n"
"(``ended``), until less than ``room`` bytes are left, or until an error (``errno``; ETIMEDOUT\n"
"when nothing came for ``timeout_ms``, EMSGSIZE for a datagram larger than the space left).\n"
"Datagrams are concatenated, each padded to 4 bytes, as ``DumpParser.feed`` reads them.");

static PyObject *recv_burst(PyObject *self, PyObject *args) {
    int fd, timeout_ms, err_no = 0, ended = 0;
    Py_ssize_t size, room, used = 0;
    unsigned long seq;
    long datagrams = 0;
    if (!PyArg_ParseTuple(args, "innki", &fd, &size, &room, &seq, &timeout_ms)) return NULL;
    if (size < room || room < 16) {
        PyErr_SetString(PyExc_ValueError, "size must be at least room, and room at least 16");
        return NULL;
    }
    PyObject *data = PyBytes_FromStringAndSize(NULL, size);
    if (data == NULL) return NULL;
    uint8_t *base = (uint8_t *)PyBytes_AS_STRING(data);
    Py_BEGIN_ALLOW_THREADS
    while (size - used >= room) {
        Py_ssize_t cap = (size - used) & ~(Py_ssize_t)3; /* padding to 4 stays inside */
        ssize_t n = recv(fd, base + used, (size_t)cap, MSG_DONTWAIT | MSG_TRUNC);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                struct pollfd pfd = {fd, POLLIN, 0};
                int r;
                if (datagrams > 0) break; /* hand over what came; the caller asks again */
                r = poll(&pfd, 1, timeout_ms);
                if (r < 0 && errno == EINTR) continue;
                if (r <= 0) { err_no = r < 0 ? errno : ETIMEDOUT; break; }
                continue;
            }
            err_no = errno;
            break;
        }
        if (n > cap) { err_no = EMSGSIZE; break; }
        datagrams++;
        if (ends_dump(base + used, n, (uint32_t)seq)) ended = 1;
        while (n & 3) base[used + n++] = 0;
        used += n;
        if (ended) break;
    }
    Py_END_ALLOW_THREADS
    if (_PyBytes_Resize(&data, used) < 0) return NULL;
    PyObject *out = Py_BuildValue("(Nlii)", data, datagrams, ended, err_no);
    return out;
}

/* --- re-check and delete of stale records ------------------------------------------- */

#define NLM_F_REQUEST_ 1
#define NLM_F_ACK_ 4
#define REQUEST_MAX 112 /* IPv6 with a zone and an id: 20 + 76 + 8 + 8 */
#define NLA_F_NESTED_ 0x8000
#define CTA_ZONE_ 18
#define NLMSG_ERROR_ 2
#define IPCTNL_MSG_CT_GET_ ((1 << 8) | 1)
#define IPCTNL_MSG_CT_DELETE_ ((1 << 8) | 2)

static inline void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void nla_hdr(uint8_t *p, uint16_t len, uint16_t type) { put16(p, len); put16(p + 2, type); }

/* One request by orig tuple, zone and id, byte for byte ``ctcodec.encode_delete`` (GET: the same
 * with another type, ``ctcodec.encode_get``). Returns its length; out holds at least REQUEST_MAX bytes. */
static unsigned encode_request(uint8_t *out, const record_t *r, uint32_t seq, uint16_t type) {
    unsigned size = r->family == AF_INET_ ? 4 : 16;
    unsigned ip_len = 4 + 2 * (4 + size), tuple_len = 4 + ip_len + 28, n = 20;
    memset(out, 0, REQUEST_MAX);
    nla_hdr(out + n, (uint16_t)tuple_len, 1 | NLA_F_NESTED_); n += 4;            /* CTA_TUPLE_ORIG */
    nla_hdr(out + n, (uint16_t)ip_len, 1 | NLA_F_NESTED_); n += 4;               /* CTA_TUPLE_IP */
    nla_hdr(out + n, (uint16_t)(4 + size), size == 4 ? CTA_IP_V4_SRC : CTA_IP_V6_SRC); n += 4;
    memcpy(out + n, r->osrc, size); n += size;
    nla_hdr(out + n, (uint16_t)(4 + size), size == 4 ? CTA_IP_V4_DST : CTA_IP_V6_DST); n += 4;
    memcpy(out + n, r->odst, size); n += size;
    nla_hdr(out + n, 28, 2 | NLA_F_NESTED_); n += 4;                            /* CTA_TUPLE_PROTO */
    nla_hdr(out + n, 5, CTA_PROTO_NUM); out[n + 4] = r->proto; n += 8;
    nla_hdr(out + n, 6, CTA_PROTO_SRC_PORT); out[n + 4] = (uint8_t)(r->osport >> 8);
    out[n + 5] = (uint8_t)r->osport; n += 8;
    nla_hdr(out + n, 6, CTA_PROTO_DST_PORT); out[n + 4] = (uint8_t)(r->odport >> 8);
    out[n + 5] = (uint8_t)r->odport; n += 8;
    if (r->zone) {
        nla_hdr(out + n, 6, CTA_ZONE_); out[n + 4] = (uint8_t)(r->zone >> 8); out[n + 5] = (uint8_t)r->zone; n += 8;
    }
    if (r->id) {
        nla_hdr(out + n, 8, CTA_ID);
        out[n + 4] = (uint8_t)(r->id >> 24); out[n + 5] = (uint8_t)(r->id >> 16);
        out[n + 6] = (uint8_t)(r->id >> 8); out[n + 7] = (uint8_t)r->id; n += 8;
    }
    put32(out, n); put16(out + 4, type); put16(out + 6, NLM_F_REQUEST_); put32(out + 8, seq); put32(out + 12, 0);
    out[16] = r->family; out[17] = 0; out[18] = 0; out[19] = 0;
    return n;
}

static int records_buffer(PyObject *obj, Py_buffer *buf, Py_ssize_t start, Py_ssize_t count) {
    if (PyObject_GetBuffer(obj, buf, PyBUF_SIMPLE) < 0) return -1;
    if (buf->len % (Py_ssize_t)sizeof(record_t) || start < 0 || count < 0 ||
        (start + count) * (Py_ssize_t)sizeof(record_t) > buf->len) {
        PyBuffer_Release(buf);
        PyErr_SetString(PyExc_ValueError, "records out of range");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(requests_doc,
"requests(records, start, count, first_seq, delete[, select[, ack_last]]) -> bytes\n\n"
"The GET (``delete`` false) or DELETE requests of records [start, start+count), the i-th with\n"
"sequence number first_seq + i, without ACK flags (with ``ack_last``, the last request encoded\n"
"has one); with ``select`` (bytes of length count, or None) only those whose byte is not 0.");

static PyObject *requests(PyObject *self, PyObject *args) {
    PyObject *obj, *select = Py_None;
    Py_ssize_t start, count, i, used = 0, last = -1;
    unsigned long first;
    int del, ack_last = 0;
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "Onnkp|Op", &obj, &start, &count, &first, &del, &select, &ack_last)) return NULL;
    if (select != Py_None && (!PyBytes_Check(select) || PyBytes_GET_SIZE(select) != count)) {
        PyErr_SetString(PyExc_ValueError, "select must be bytes of length count");
        return NULL;
    }
    if (records_buffer(obj, &buf, start, count)) return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, count * REQUEST_MAX);
    if (out == NULL) { PyBuffer_Release(&buf); return NULL; }
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
    const char *sel = select == Py_None ? NULL : PyBytes_AS_STRING(select);
    for (i = 0; i < count; i++) {
        record_t r;
        if (sel != NULL && !sel[i]) continue;
        memcpy(&r, (const uint8_t *)buf.buf + (size_t)(start + i) * sizeof r, sizeof r);
        last = used;
        used += encode_request(o + used, &r, (uint32_t)(first + (unsigned long)i),
                               del ? IPCTNL_MSG_CT_DELETE_ : IPCTNL_MSG_CT_GET_);
    }
    if (ack_last && last >= 0) put16(o + last + 6, NLM_F_REQUEST_ | NLM_F_ACK_);
    PyBuffer_Release(&buf);
    if (_PyBytes_Resize(&out, used) < 0) return NULL;
    return out;
}

#define RECHECK_LOST 0
#define RECHECK_DELETE 1
#define RECHECK_GONE 2
#define RECHECK_ERROR 3
#define RECHECK_ASK 4

PyDoc_STRVAR(recheck_doc,
"recheck(answers, first_seq, records, start, count, codes) -> (errors, changed)\n\n"
"Read the answers to ``requests(..., delete=False)`` (datagrams concatenated, each padded to\n"
"4 bytes) and fill ``codes`` (a bytearray of length count, zero: no answer yet): 1 the same entry,\n"
"its SEEN_REPLY bit and mark as dumped (delete it); 2 gone (ENOENT, or another id: recreated);\n"
"3 an error, listed in ``errors`` as (index, errno); 4 the same entry with another status bit\n"
"or mark, listed in ``changed`` as (index, status, id, mark, timeout) for the caller's condition.\n"
"As ``ctcodec.parse_get_answers``, an entry answer without status or id is EBADMSG.");

static PyObject *recheck(PyObject *self, PyObject *args) {
    PyObject *answers, *obj, *codes_obj;
    unsigned long first;
    Py_ssize_t start, count, pos = 0, n;
    Py_buffer abuf, rbuf;
    if (!PyArg_ParseTuple(args, "OkOnnO", &answers, &first, &obj, &start, &count, &codes_obj)) return NULL;
    if (!PyByteArray_Check(codes_obj) || PyByteArray_GET_SIZE(codes_obj) != count) {
        PyErr_SetString(PyExc_ValueError, "codes must be a bytearray of length count");
        return NULL;
    }
    if (PyObject_GetBuffer(answers, &abuf, PyBUF_SIMPLE) < 0) return NULL;
    if (records_buffer(obj, &rbuf, start, count)) { PyBuffer_Release(&abuf); return NULL; }
    uint8_t *codes = (uint8_t *)PyByteArray_AS_STRING(codes_obj);
    PyObject *errors = PyList_New(0), *changed = PyList_New(0);
    if (errors == NULL || changed == NULL) goto fail;
    const uint8_t *base = (const uint8_t *)abuf.buf;
    n = abuf.len;
    while (pos + 16 <= n) {
        const uint8_t *m = base + pos;
        uint32_t mlen = host32(m), seq;
        uint16_t mtype = host16(m + 4);
        Py_ssize_t index;
        if (mlen < 16 || (Py_ssize_t)mlen > n - pos) break;
        seq = host32(m + 8);
        if (mtype == NLMSG_ERROR_ && mlen >= 36) seq = host32(m + 20 + 8); /* the request's header */
        index = (Py_ssize_t)(uint32_t)(seq - (uint32_t)first);
        if (index >= 0 && index < count && (mtype == NLMSG_ERROR_ || mtype == IPCTNL_MSG_CT_NEW)) {
            record_t r;
            memcpy(&r, (const uint8_t *)rbuf.buf + (size_t)(start + index) * sizeof r, sizeof r);
            if (mtype == NLMSG_ERROR_) {
                if (mlen >= 36) {
                    int32_t e;
                    memcpy(&e, m + 16, 4);
                    e = -e;
                    if (e == ENOENT) codes[index] = RECHECK_GONE;
                    else {
                        PyObject *t = Py_BuildValue("(ni)", index, e);
                        if (t == NULL || PyList_Append(errors, t) < 0) { Py_XDECREF(t); goto fail; }
                        Py_DECREF(t);
                        codes[index] = RECHECK_ERROR;
                    }
                }
            } else {
                const uint8_t *p = m + 20, *end = m + mlen;
                int64_t status = -1, id = -1;
                uint32_t mark = 0, timeout = 0;
                unsigned len, type;
                while (p + 4 <= end) {
                    len = host16(p);
                    type = host16(p + 2) & NLA_TYPE_MASK;
                    if (len < 4 || p + len > end) break;
                    if (len >= 8) {
                        if (type == CTA_STATUS) status = be32(p + 4);
                        else if (type == CTA_ID) id = be32(p + 4);
                        else if (type == CTA_MARK) mark = be32(p + 4);
                        else if (type == CTA_TIMEOUT) timeout = be32(p + 4);
                    }
                    p += ALIGN4(len);
                }
                if (status < 0 || id < 0) {
                    PyObject *t = Py_BuildValue("(ni)", index, EBADMSG);
                    if (t == NULL || PyList_Append(errors, t) < 0) { Py_XDECREF(t); goto fail; }
                    Py_DECREF(t);
                    codes[index] = RECHECK_ERROR;
                } else if (r.id && (uint32_t)id != r.id) {
                    codes[index] = RECHECK_GONE;
                } else if (((uint32_t)status & IPS_SEEN_REPLY) == (r.status & IPS_SEEN_REPLY) && mark == r.mark) {
                    codes[index] = RECHECK_DELETE;
                } else {
                    PyObject *t = Py_BuildValue("(nkkkk)", index, (unsigned long)status, (unsigned long)id,
                                                (unsigned long)mark, (unsigned long)timeout);
                    if (t == NULL || PyList_Append(changed, t) < 0) { Py_XDECREF(t); goto fail; }
                    Py_DECREF(t);
                    codes[index] = RECHECK_ASK;
                }
            }
        }
        pos += ALIGN4(mlen);
    }
    PyBuffer_Release(&abuf);
    PyBuffer_Release(&rbuf);
    return Py_BuildValue("(NN)", errors, changed);
fail:
    Py_XDECREF(errors);
    Py_XDECREF(changed);
    PyBuffer_Release(&abuf);
    PyBuffer_Release(&rbuf);
    return NULL;
}

/* ------------------------------------------------------------------------------------------------
 * iptables_line: ``iptables._FAST_LINE.fullmatch(line)`` and its groups, without the regex engine.
 *
 * It reads the grammar the regex spells, part by part, each part at most once: every optional
 * part starts with its own words (" -s ", " -d ", " -i ", " -o ", " -p ", " -m tcp" or " -m udp",
 * " -m comment --comment ", " -j "), no part's start is another's, and every repetition in the
 * regex is possessive or (the port digits) followed by what cannot be a digit, so the regex never
 * gives back a part it matched: where a part's words are there but the part does not match, or
 * anything is left at the end, the line is not taken (None), as the regex would not take it.
 * It must never take a line the regex refuses or give other groups; tests/edges/test_iptables_fast.py
 * holds the two against each other (generated lines, near misses, the corpus).
 * ---------------------------------------------------------------------------------------------- */

#define IPT_GROUPS 15 /* group 0 (the line: a full match) and the regex's 14 groups */

/* Each character's classes (IPT_WORD: _WORD, printable ASCII but space, " ' and \; IPT_FIRST: _ARG's
 * first character, also neither ! nor -; IPT_QUOTED: in a quoted comment, anything but " \ ' and
 * IPT_QFIRST: its first character, also neither ! nor -), by a table for Latin-1 (ipt_init). */
#define IPT_WORD 1
#define IPT_FIRST 2
#define IPT_DIGIT 4
#define IPT_LOWER 8
#define IPT_QUOTED 16
#define IPT_QFIRST 32
static uint8_t ipt_table[256];
#define IPT_CLS(c) ((c) < 256 ? ipt_table[(c)] : (IPT_QUOTED | IPT_QFIRST))

static void ipt_init(void) {
    for (int c = 0; c < 256; c++) {
        uint8_t k = 0;
        if (c >= 0x21 && c <= 0x7e && c != '"' && c != '\'' && c != '\\') k |= IPT_WORD;
        if ((k & IPT_WORD) && c != '!' && c != '-') k |= IPT_FIRST;
        if (c >= '0' && c <= '9') k |= IPT_DIGIT;
        if (c >= 'a' && c <= 'z') k |= IPT_LOWER;
        if (c != '"' && c != '\'' && c != '\\') k |= IPT_QUOTED;
        if ((k & IPT_QUOTED) && c != '!' && c != '-') k |= IPT_QFIRST;
        ipt_table[c] = k;
    }
}

/* Do the n - pos characters at pos start with the ASCII ``lit`` (len characters)? */
static inline __attribute__((always_inline)) int ipt_at(int kind, const void *d, Py_ssize_t n, Py_ssize_t pos,
                                                        const char *lit, Py_ssize_t len) {
    if (n - pos < len) return 0;
    for (Py_ssize_t i = 0; i < len; i++)
        if (PyUnicode_READ(kind, d, pos + i) != (Py_UCS4)(unsigned char)lit[i]) return 0;
    return 1;
}

/* The end of the _ARG at a, or -1 if there is none. */
static inline __attribute__((always_inline)) Py_ssize_t ipt_arg(int kind, const void *d, Py_ssize_t n, Py_ssize_t a) {
    if (a >= n || !(IPT_CLS(PyUnicode_READ(kind, d, a)) & IPT_FIRST)) return -1;
    for (a++; a < n && (IPT_CLS(PyUnicode_READ(kind, d, a)) & IPT_WORD); a++) {}
    return a;
}

/* The regex's fullmatch: 1 and the groups' spans (start, end; -1 for a group that took no part), or 0.
 * Called with a constant kind, so that each kind gets its own loop. */
static inline __attribute__((always_inline)) int ipt_scan(int kind, const void *d, Py_ssize_t n, Py_ssize_t *span) {
    static const char *const flags[5] = {" -s ", " -d ", " -i ", " -o ", " -p "};
    Py_ssize_t pos, e;
#define IPT_C(i) PyUnicode_READ(kind, d, (i))
    for (int g = 0; g < 2 * IPT_GROUPS; g++) span[g] = -1;
    if (!ipt_at(kind, d, n, 0, "-A ", 3) || (pos = ipt_arg(kind, d, n, 3)) < 0) return 0;
    span[2] = 3;
    span[3] = pos;
    for (int i = 0; i < 5; i++) { /* groups 2-6: " -s ARG", " -d ARG", " -i ARG", " -o ARG", " -p ARG" */
        if (!ipt_at(kind, d, n, pos, flags[i], 4)) continue;
        if ((e = ipt_arg(kind, d, n, pos + 4)) < 0) return 0;
        span[4 + 2 * i] = pos + 4;
        span[5 + 2 * i] = e;
        pos = e;
    }
    if (ipt_at(kind, d, n, pos, " -m tcp", 7) || ipt_at(kind, d, n, pos, " -m udp", 7)) {
        span[14] = pos + 1; /* group 7: the module whole, 8: its name, 9: --sport, 10: --dport */
        span[16] = pos + 4;
        span[17] = pos = pos + 7;
        for (int i = 0; i < 2; i++) {
            if (!ipt_at(kind, d, n, pos, i ? " --dport " : " --sport ", 9)) continue;
            for (e = pos + 9; e < n && (IPT_CLS(IPT_C(e)) & IPT_DIGIT); e++) {}
            if (e == pos + 9 || e - (pos + 9) > 5) return 0; /* [0-9]{1,5}, then no digit */
            span[18 + 2 * i] = pos + 9;
            span[19 + 2 * i] = e;
            pos = e;
        }
        span[15] = pos;
    }
    if (ipt_at(kind, d, n, pos, " -m comment --comment ", 22)) { /* group 11 */
        Py_ssize_t a = pos + 22;
        if (a < n && IPT_C(a) == '"') {
            e = a + 1;
            if (e < n && (IPT_CLS(IPT_C(e)) & IPT_QFIRST))
                for (e++; e < n && (IPT_CLS(IPT_C(e)) & IPT_QUOTED); e++) {}
            if (e >= n || IPT_C(e) != '"') return 0;
            e++;
        } else if ((e = ipt_arg(kind, d, n, a)) < 0) {
            return 0;
        }
        span[22] = a;
        span[23] = pos = e;
    }
    if (ipt_at(kind, d, n, pos, " -j ", 4)) { /* group 12: the target whole, 13: its name, 14: its options */
        if ((e = ipt_arg(kind, d, n, pos + 4)) < 0) return 0;
        span[24] = pos + 1;
        span[26] = pos + 4;
        span[27] = span[28] = e;
        while (ipt_at(kind, d, n, e, " --", 3) && e + 3 < n && (IPT_CLS(IPT_C(e + 3)) & IPT_LOWER)) {
            for (e += 4; e < n && ((IPT_CLS(IPT_C(e)) & IPT_LOWER) || IPT_C(e) == '-'); e++) {}
            while (e + 1 < n && IPT_C(e) == ' ' && (IPT_CLS(IPT_C(e + 1)) & IPT_FIRST))
                for (e += 2; e < n && (IPT_CLS(IPT_C(e)) & IPT_WORD); e++) {}
        }
        span[25] = span[29] = pos = e;
    }
#undef IPT_C
    return pos == n;
}

PyDoc_STRVAR(iptables_line_doc,
"iptables_line(line, /) -> tuple | None\n\n"
"``iptables._FAST_LINE.fullmatch(line)`` as ``(line, *groups())``, read without the regex engine;\n"
"None where the regex would not match.");

static PyObject *iptables_line(PyObject *self, PyObject *line) {
    Py_ssize_t span[2 * IPT_GROUPS];
    int ok;
    if (!PyUnicode_Check(line)) {
        PyErr_SetString(PyExc_TypeError, "iptables_line: a str is needed");
        return NULL;
    }
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(line) < 0) return NULL;
#endif
    const void *d = PyUnicode_DATA(line);
    Py_ssize_t n = PyUnicode_GET_LENGTH(line);
    switch (PyUnicode_KIND(line)) {
    case PyUnicode_1BYTE_KIND: ok = ipt_scan(PyUnicode_1BYTE_KIND, d, n, span); break;
    case PyUnicode_2BYTE_KIND: ok = ipt_scan(PyUnicode_2BYTE_KIND, d, n, span); break;
    default: ok = ipt_scan(PyUnicode_4BYTE_KIND, d, n, span); break;
    }
    if (!ok) Py_RETURN_NONE;
    PyObject *out = PyTuple_New(IPT_GROUPS);
    if (out == NULL) return NULL;
    Py_INCREF(line);
    PyTuple_SET_ITEM(out, 0, line);
    for (int g = 1; g < IPT_GROUPS; g++) {
        PyObject *item;
        if (span[2 * g] < 0) {
            item = Py_None;
            Py_INCREF(item);
        } else if ((item = PyUnicode_Substring(line, span[2 * g], span[2 * g + 1])) == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, g, item);
    }
    return out;
}

static PyMethodDef methods[] = {
    {"feed", feed, METH_VARARGS, feed_doc},
    {"recv_burst", recv_burst, METH_VARARGS, recv_burst_doc},
    {"requests", requests, METH_VARARGS, requests_doc},
    {"recheck", recheck, METH_VARARGS, recheck_doc},
    {"iptables_line", iptables_line, METH_O, iptables_line_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ctscan",
    "The compiled fast path of a ctnetlink dump scan (see topowatch.edges.ctscan), and the iptables "
    "reader's line regex in C (iptables_line).", -1, methods,
};

PyMODINIT_FUNC PyInit__ctscan(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    ipt_init();
    if (PyModule_AddIntConstant(m, "IPS_SEEN_REPLY", IPS_SEEN_REPLY) || PyModule_AddIntConstant(m, "IPS_SRC_NAT_DONE", IPS_SRC_NAT_DONE) ||
        PyModule_AddIntConstant(m, "IPS_DST_NAT_DONE", IPS_DST_NAT_DONE) || PyModule_AddIntConstant(m, "RANGE_BYTES", RANGE_BYTES) ||
        PyModule_AddIntConstant(m, "RECORD_BYTES", (long)sizeof(record_t))) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
