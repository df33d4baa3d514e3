/* lbsync._ctfast: the ctnetlink codec's per-event hot paths in C (optional accelerator).
 *
 * Byte-for-byte the same results as the pure-Python code in lbsync/kernel/ctnetlink.py and
 * lbsync/node.py, for the shapes handled here; for anything else these functions decline and
 * the Python code runs instead (so errors, surprises and their exceptions stay the Python
 * code's):
 *
 *  - decode_ct(buf, pos, dump, events) -> int: decodes the conntrack messages (CT_NEW /
 *    CT_DELETE) of ``buf`` from ``pos`` on, appending CtEvent tuples to ``events``, and stops
 *    at the first message it does not decode completely (any other message type, anything
 *    malformed or unusual); returns that message's offset (>= len(buf) when all were done).
 *    A message is appended whole or not at all.
 *  - recv_events(fd, buf, max_calls, events): the event reader's receive loop (several
 *    non-blocking receives per call), each buffer decoded as by decode_ct; see below.
 *  - create(record, seq, flags, default_timeout) -> bytes | None: the CT_NEW create of a
 *    packed record on the fast path of ``_create_fast`` (port protocols, zone 0, no helper,
 *    labels, seqadj or master; optional TCP protoinfo and NAT ranges), or None.
 *  - create_batch(records, seq_start, ack_last, default_timeout, fallback) -> bytes: the batch
 *    encoder; records off the fast path are encoded by ``fallback(record, seq, ack)``.
 *  - standby_check(key, record) -> int | None: node._standby_check, or None (not decided here).
 *  - decode_data(body, buckets, max_key, max_bin) -> list | None: the replication receiver's
 *    lbsync.replication.wire.decode_body of a DATA body holding only flow updates and flow
 *    deletes (FlowUpdate / FlowDelete instances, registered by set_message_types), or None.
 *  - keys_of_dump(buf, marks, keys) -> (done, interrupted) | None: the owner sweep's keys-only
 *    dump decoder (lbsync.kernel.conntrack.keys_of_dump), or None (the Python one runs).
 *  - entry_hash, digest_sum, digest_delta: lbsync.replication.store's BLAKE2b-64 entry hash,
 *    the sum of a table's, the incremental digest's change (BLAKE2b from libb2), or None
 *    for anything but bytes keys (< 64 KiB) and records.
 *
 * Every read is bounds-checked against the message/attribute end before it happens. The
 * msgpack reader accepts a strict subset of what msgpack.unpackb (with unpack_fields' limits)
 * accepts, with the same values, and declines everything else.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <blake2.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>

#define AF_INET_ 2
#define AF_INET6_ 10
#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17
#define IPPROTO_DCCP_ 33
#define IPPROTO_SCTP_ 132
#define IPPROTO_UDPLITE_ 136
#define NLA_F_NESTED 0x8000
#define NLA_TYPE_MASK 0x3FFF
#define IPS_SEEN_REPLY 0x2
#define IPS_CONFIRMED 0x8
#define IPS_SRC_NAT 0x10
#define IPS_DST_NAT 0x20
#define CREATE_STATUS_MASK (0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x40 | 0x400 | 0x2000)
#define CTA_NAT_SRC 6
#define CTA_NAT_DST 13

static PyObject *event_type = NULL; /* lbsync.kernel.ctnetlink.CtEvent */

/* -- little helpers ----------------------------------------------------------------------- */

static inline uint16_t rd_u16n(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t rd_u32n(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint32_t rd_be16(const uint8_t *p) { return ((uint32_t)p[0] << 8) | p[1]; }
static inline uint32_t rd_be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline uint64_t rd_be64(const uint8_t *p)
{
    return ((uint64_t)rd_be32(p) << 32) | rd_be32(p + 4);
}
static inline void put_hdr(uint8_t *p, uint16_t len, uint16_t type)
{
    memcpy(p, &len, 2);
    memcpy(p + 2, &type, 2);
}
static inline void put_be16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}
static inline int port_proto(uint64_t l4)
{
    return l4 == IPPROTO_TCP_ || l4 == IPPROTO_UDP_ || l4 == IPPROTO_DCCP_
        || l4 == IPPROTO_SCTP_ || l4 == IPPROTO_UDPLITE_;
}

/* -- decoding ----------------------------------------------------------------------------- */

typedef struct {
    int l4;
    const uint8_t *src, *dst;
    Py_ssize_t slen, dlen;
    uint32_t sport, dport;
} ctuple;

/* ctnetlink._tuple (the generic walk; the fixed-layout fast path gives the same values).
 * 0 = decoded, -1 = decline (Python raises for every such input). */
static int parse_tuple(const uint8_t *b, Py_ssize_t pos, Py_ssize_t end, ctuple *t)
{
    int proto = -1, itype = -1, icode = -1;
    t->src = t->dst = NULL;
    t->slen = t->dlen = 0;
    t->sport = t->dport = 0;
    while (pos < end) {
        if (end - pos < 4)
            return -1;
        Py_ssize_t alen = rd_u16n(b + pos);
        int atype = rd_u16n(b + pos + 2) & NLA_TYPE_MASK;
        if (alen < 4 || pos + alen > end)
            return -1;
        Py_ssize_t p = pos + 4, e = pos + alen;
        if (atype == 1) { /* CTA_TUPLE_IP */
            while (p < e) {
                if (e - p < 4)
                    return -1;
                Py_ssize_t blen = rd_u16n(b + p);
                int btype = rd_u16n(b + p + 2) & NLA_TYPE_MASK;
                if (blen < 4 || p + blen > e)
                    return -1;
                if (btype == 1 || btype == 3) {
                    t->src = b + p + 4;
                    t->slen = blen - 4;
                } else if (btype == 2 || btype == 4) {
                    t->dst = b + p + 4;
                    t->dlen = blen - 4;
                }
                p += (blen + 3) & ~(Py_ssize_t)3;
            }
        } else if (atype == 2) { /* CTA_TUPLE_PROTO */
            while (p < e) {
                if (e - p < 4)
                    return -1;
                Py_ssize_t blen = rd_u16n(b + p);
                int btype = rd_u16n(b + p + 2) & NLA_TYPE_MASK;
                if (blen < 4 || p + blen > e)
                    return -1;
                if (btype == 1) {
                    if (blen != 5)
                        return -1;
                    proto = b[p + 4];
                } else if (btype == 2 || btype == 4 || btype == 7) {
                    if (blen != 6)
                        return -1;
                    t->sport = rd_be16(b + p + 4);
                } else if (btype == 3) {
                    if (blen != 6)
                        return -1;
                    t->dport = rd_be16(b + p + 4);
                } else if (btype == 5 || btype == 8) {
                    if (blen != 5)
                        return -1;
                    itype = b[p + 4];
                } else if (btype == 6 || btype == 9) {
                    if (blen != 5)
                        return -1;
                    icode = b[p + 4];
                }
                p += (blen + 3) & ~(Py_ssize_t)3;
            }
        }
        pos += (alen + 3) & ~(Py_ssize_t)3;
    }
    if (proto < 0 || t->slen == 0 || t->slen != t->dlen || (t->slen != 4 && t->slen != 16))
        return -1;
    if (itype >= 0 || icode >= 0)
        t->dport = ((uint32_t)(itype < 0 ? 0 : itype) << 8) | (uint32_t)(icode < 0 ? 0 : icode);
    t->l4 = proto;
    return 0;
}

/* The event prefix (ctnetlink._prefix_structs): CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_ID,
 * CTA_STATUS, CTA_TIMEOUT in the kernel's fixed layout; only the attribute headers are
 * compared, as in Python. */
typedef struct {
    Py_ssize_t size, tlen;
    uint8_t hdr[2][13][4];  /* per tuple: header words at offsets hoff[] */
    Py_ssize_t hoff[8];     /* offsets of the 8 header words inside one tuple */
    Py_ssize_t src_off, dst_off, num_off, sport_off, dport_off;
    uint8_t tail[3][4];     /* CTA_ID, CTA_STATUS, CTA_TIMEOUT headers */
} prefix_t;

static prefix_t PREFIX4, PREFIX6;

static void prefix_init(prefix_t *x, Py_ssize_t alen)
{
    x->tlen = 4 + 4 + 2 * (4 + alen) + 28;
    x->size = 2 * x->tlen + 24;
    Py_ssize_t o[8] = {0, 4, 8, 12 + alen, 16 + 2 * alen, 20 + 2 * alen, 28 + 2 * alen,
                       36 + 2 * alen};
    memcpy(x->hoff, o, sizeof o);
    x->src_off = 12;
    x->dst_off = 16 + alen;
    x->num_off = 24 + 2 * alen;
    x->sport_off = 32 + 2 * alen;
    x->dport_off = 40 + 2 * alen;
    uint16_t st = alen == 4 ? 1 : 3, dt = alen == 4 ? 2 : 4;
    for (int k = 0; k < 2; k++) {
        put_hdr(x->hdr[k][0], (uint16_t)x->tlen, (uint16_t)((k + 1) | NLA_F_NESTED));
        put_hdr(x->hdr[k][1], (uint16_t)(4 + 2 * (4 + alen)), 1 | NLA_F_NESTED);
        put_hdr(x->hdr[k][2], (uint16_t)(4 + alen), st);
        put_hdr(x->hdr[k][3], (uint16_t)(4 + alen), dt);
        put_hdr(x->hdr[k][4], 28, 2 | NLA_F_NESTED);
        put_hdr(x->hdr[k][5], 5, 1);
        put_hdr(x->hdr[k][6], 6, 2);
        put_hdr(x->hdr[k][7], 6, 3);
    }
    put_hdr(x->tail[0], 8, 12);
    put_hdr(x->tail[1], 8, 3);
    put_hdr(x->tail[2], 8, 7);
}

static int prefix_match(const prefix_t *x, const uint8_t *b)
{
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < 8; i++)
            if (memcmp(b + k * x->tlen + x->hoff[i], x->hdr[k][i], 4) != 0)
                return 0;
    for (int i = 0; i < 3; i++)
        if (memcmp(b + 2 * x->tlen + 8 * i, x->tail[i], 4) != 0)
            return 0;
    return 1;
}

static void prefix_tuple(const prefix_t *x, const uint8_t *b, Py_ssize_t alen, ctuple *t)
{
    t->src = b + x->src_off;
    t->dst = b + x->dst_off;
    t->slen = t->dlen = alen;
    t->l4 = b[x->num_off];
    t->sport = rd_be16(b + x->sport_off);
    t->dport = rd_be16(b + x->dport_off);
}

static uint8_t H_TCPINFO[12], H_TCPREST[4][4];

typedef struct {
    int n;          /* 0: none, 5: TCP, 3: SCTP/DCCP */
    uint64_t v[5];
} protoinfo_t;

/* ctnetlink._protoinfo; -1 = decline */
static int parse_protoinfo(const uint8_t *b, Py_ssize_t pos, Py_ssize_t end, protoinfo_t *pi)
{
    pi->n = 0;
    while (pos < end) {
        if (end - pos < 4)
            return -1;
        Py_ssize_t alen = rd_u16n(b + pos);
        int atype = rd_u16n(b + pos + 2) & NLA_TYPE_MASK;
        if (alen < 4 || pos + alen > end)
            return -1;
        Py_ssize_t p = pos + 4, e = pos + alen;
        if (atype == 1 || atype == 3 || atype == 2) { /* TCP, SCTP, DCCP */
            uint64_t v[5] = {0, 0, 0, 0, 0};
            while (p < e) {
                if (e - p < 4)
                    return -1;
                Py_ssize_t blen = rd_u16n(b + p);
                int btype = rd_u16n(b + p + 2) & NLA_TYPE_MASK;
                if (blen < 4 || p + blen > e)
                    return -1;
                if (atype == 1) {
                    if (btype >= 1 && btype <= 3) {
                        if (blen != 5)
                            return -1;
                        v[btype - 1] = b[p + 4];
                    } else if (btype == 4 || btype == 5) {
                        if (blen != 6)
                            return -1;
                        v[btype - 1] = b[p + 4];
                    }
                } else if (atype == 3) {
                    if (btype == 1) {
                        if (blen != 5)
                            return -1;
                        v[0] = b[p + 4];
                    } else if (btype == 2 || btype == 3) {
                        if (blen != 8)
                            return -1;
                        v[btype - 1] = rd_be32(b + p + 4);
                    }
                } else {
                    if (btype == 1 || btype == 2) {
                        if (blen != 5)
                            return -1;
                        v[btype - 1] = b[p + 4];
                    } else if (btype == 3) {
                        if (blen != 12)
                            return -1;
                        v[2] = rd_be64(b + p + 4);
                    }
                }
                p += (blen + 3) & ~(Py_ssize_t)3;
            }
            pi->n = atype == 1 ? 5 : 3;
            memcpy(pi->v, v, sizeof v);
            return 0;
        }
        pos += (alen + 3) & ~(Py_ssize_t)3;
    }
    return 0;
}

/* ctnetlink._seqadj */
static int parse_seqadj(const uint8_t *b, Py_ssize_t pos, Py_ssize_t end, uint32_t out[3])
{
    out[0] = out[1] = out[2] = 0;
    while (pos < end) {
        if (end - pos < 4)
            return -1;
        Py_ssize_t alen = rd_u16n(b + pos);
        int atype = rd_u16n(b + pos + 2) & NLA_TYPE_MASK;
        if (alen < 4 || pos + alen > end)
            return -1;
        if (atype >= 1 && atype <= 3) {
            if (alen != 8)
                return -1;
            out[atype - 1] = rd_be32(b + pos + 4);
        }
        pos += (alen + 3) & ~(Py_ssize_t)3;
    }
    return 0;
}

/* ctnetlink._helper_name: 1 = name found (ASCII, up to its NUL), 0 = none, -1 = decline */
static int parse_helper(const uint8_t *b, Py_ssize_t pos, Py_ssize_t end, const uint8_t **name,
                        Py_ssize_t *nlen)
{
    while (pos < end) {
        if (end - pos < 4)
            return -1;
        Py_ssize_t alen = rd_u16n(b + pos);
        int atype = rd_u16n(b + pos + 2) & NLA_TYPE_MASK;
        if (alen < 4 || pos + alen > end)
            return -1;
        if (atype == 1) {
            const uint8_t *s = b + pos + 4;
            Py_ssize_t n = alen - 4, i;
            for (i = 0; i < n && s[i] != 0; i++)
                if (s[i] >= 0x80)
                    return -1;
            *name = s;
            *nlen = i;
            return 1;
        }
        pos += (alen + 3) & ~(Py_ssize_t)3;
    }
    return 0;
}

/* -- msgpack writing (msgpack-python Packer(use_bin_type=True) encodings) ------------------- */

static inline uint8_t *mp_uint(uint8_t *w, uint64_t v)
{
    if (v < 0x80) {
        *w++ = (uint8_t)v;
    } else if (v < 0x100) {
        *w++ = 0xcc; *w++ = (uint8_t)v;
    } else if (v < 0x10000) {
        *w++ = 0xcd; put_be16(w, (uint32_t)v); w += 2;
    } else if (v < 0x100000000ULL) {
        *w++ = 0xce; put_be32(w, (uint32_t)v); w += 4;
    } else {
        *w++ = 0xcf; put_be32(w, (uint32_t)(v >> 32)); put_be32(w + 4, (uint32_t)v); w += 8;
    }
    return w;
}

static inline uint8_t *mp_bin(uint8_t *w, const uint8_t *p, Py_ssize_t n)
{
    if (n < 0x100) {
        *w++ = 0xc4; *w++ = (uint8_t)n;
    } else {
        *w++ = 0xc5; put_be16(w, (uint32_t)n); w += 2;
    }
    memcpy(w, p, (size_t)n);
    return w + n;
}

static inline uint8_t *mp_str(uint8_t *w, const uint8_t *p, Py_ssize_t n)
{
    if (n < 32) {
        *w++ = (uint8_t)(0xa0 | n);
    } else if (n < 0x100) {
        *w++ = 0xd9; *w++ = (uint8_t)n;
    } else {
        *w++ = 0xda; put_be16(w, (uint32_t)n); w += 2;
    }
    memcpy(w, p, (size_t)n);
    return w + n;
}

/* Largest helper name / labels handled here (the kernel's labels are 16 bytes, helper names
 * 16); anything longer is left to Python. */
#define MAX_NAME 64
#define MAX_LABELS 256
#define RECORD_MAX 1024

static PyObject *new_event(long kind, PyObject *key, uint32_t mark, int l4, int tcp_state,
                           uint32_t status, PyObject *record, uint32_t portid)
{
    PyObject *items[8];
    items[0] = PyLong_FromLong(kind);
    items[1] = key;
    items[2] = PyLong_FromUnsignedLong(mark);
    items[3] = PyLong_FromLong(l4);
    items[4] = PyLong_FromLong(tcp_state);
    items[5] = PyLong_FromUnsignedLong(status);
    items[6] = record;
    items[7] = PyLong_FromUnsignedLong(portid);
    PyObject *ev = NULL;
    if (items[0] && items[2] && items[3] && items[4] && items[5] && items[7]) {
#if PY_VERSION_HEX < 0x030E0000
        /* what tuple.__new__(CtEvent, ...) does for a tuple subclass (tuple_subtype_new) */
        PyTypeObject *tp = (PyTypeObject *)event_type;
        ev = tp->tp_alloc(tp, 8);
        if (ev != NULL) {
            for (int i = 0; i < 8; i++) {
                Py_INCREF(items[i]);
                PyTuple_SET_ITEM(ev, i, items[i]);
            }
        }
#else
        PyObject *t = PyTuple_New(8);
        if (t != NULL) {
            for (int i = 0; i < 8; i++) {
                Py_INCREF(items[i]);
                PyTuple_SET_ITEM(t, i, items[i]);
            }
            PyObject *args = PyTuple_Pack(1, t);
            Py_DECREF(t);
            if (args != NULL) {
                ev = PyTuple_Type.tp_new((PyTypeObject *)event_type, args, NULL);
                Py_DECREF(args);
            }
        }
#endif
    }
    for (int i = 0; i < 8; i++)
        if (i != 1 && i != 6)
            Py_XDECREF(items[i]);
    return ev;
}

/* ctnetlink._decode_ct for one message's attributes. Returns a new CtEvent, or NULL with no
 * exception set (decline), or NULL with an exception set (out of memory). */
static PyObject *decode_one(const uint8_t *b, Py_ssize_t pos, Py_ssize_t end, int family,
                            long kind, uint32_t portid)
{
    ctuple orig, reply, master;
    int has_orig = 0, has_reply = 0, has_master = 0;
    uint32_t status = 0, mark = 0, zone = 0, timeout = 0;
    int has_timeout = 0;
    protoinfo_t pi;
    pi.n = 0;
    const uint8_t *helper = NULL, *labels = NULL;
    Py_ssize_t helper_len = 0, labels_len = 0;
    int has_helper = 0, has_labels = 0;
    uint32_t sa_o[3], sa_r[3];
    int has_sa_o = 0, has_sa_r = 0;
    Py_ssize_t alen_f;
    const prefix_t *px;

    if (family == AF_INET_) {
        alen_f = 4;
        px = &PREFIX4;
    } else if (family == AF_INET6_) {
        alen_f = 16;
        px = &PREFIX6;
    } else {
        return NULL; /* Python raises: no tuple matches an unknown family */
    }
    if (end - pos >= px->size && prefix_match(px, b + pos)) {
        prefix_tuple(px, b + pos, alen_f, &orig);
        prefix_tuple(px, b + pos + px->tlen, alen_f, &reply);
        status = rd_be32(b + pos + 2 * px->tlen + 12);
        timeout = rd_be32(b + pos + 2 * px->tlen + 20);
        has_orig = has_reply = has_timeout = 1;
        pos += px->size;
    }
    while (pos < end) {
        if (end - pos < 4)
            return NULL;
        Py_ssize_t alen = rd_u16n(b + pos);
        int atype = rd_u16n(b + pos + 2) & NLA_TYPE_MASK;
        if (alen < 4 || pos + alen > end)
            return NULL;
        switch (atype) {
        case 1:
            if (parse_tuple(b, pos + 4, pos + alen, &orig) < 0)
                return NULL;
            has_orig = 1;
            break;
        case 2:
            if (parse_tuple(b, pos + 4, pos + alen, &reply) < 0)
                return NULL;
            has_reply = 1;
            break;
        case 3: case 7: case 8: {
            if (alen != 8)
                return NULL;
            uint32_t v = rd_be32(b + pos + 4);
            if (atype == 3)
                status = v;
            else if (atype == 7) {
                timeout = v;
                has_timeout = 1;
            } else
                mark = v;
            break;
        }
        case 4:
            if (alen == 48 && memcmp(b + pos, H_TCPINFO, 12) == 0) {
                for (int i = 0; i < 4; i++)
                    if (memcmp(b + pos + 16 + 8 * i, H_TCPREST[i], 4) != 0)
                        return NULL;
                pi.n = 5;
                pi.v[0] = b[pos + 12];
                for (int i = 0; i < 4; i++)
                    pi.v[i + 1] = b[pos + 20 + 8 * i];
            } else if (parse_protoinfo(b, pos + 4, pos + alen, &pi) < 0) {
                return NULL;
            }
            break;
        case 18:
            if (alen != 6)
                return NULL;
            zone = rd_be16(b + pos + 4);
            break;
        case 5: {
            int r = parse_helper(b, pos + 4, pos + alen, &helper, &helper_len);
            if (r < 0)
                return NULL;
            has_helper = r;
            break;
        }
        case 22:
            labels = b + pos + 4;
            labels_len = alen - 4;
            has_labels = 1;
            break;
        case 14:
            if (parse_tuple(b, pos + 4, pos + alen, &master) < 0)
                return NULL;
            has_master = 1;
            break;
        case 15:
            if (parse_seqadj(b, pos + 4, pos + alen, sa_o) < 0)
                return NULL;
            has_sa_o = 1;
            break;
        case 16:
            if (parse_seqadj(b, pos + 4, pos + alen, sa_r) < 0)
                return NULL;
            has_sa_r = 1;
            break;
        default: /* ignored or unknown */
            break;
        }
        pos += (alen + 3) & ~(Py_ssize_t)3;
    }
    if (!has_orig || !has_reply)
        return NULL;
    int l4 = orig.l4;
    if (orig.slen != alen_f || reply.slen != alen_f || reply.l4 != l4)
        return NULL;
    if (has_master && master.slen != alen_f)
        return NULL;
    if (pi.n != 0 && !((l4 == IPPROTO_TCP_ && pi.n == 5)
                       || (l4 != IPPROTO_TCP_ && pi.n == 3
                           && (l4 == IPPROTO_SCTP_ || l4 == IPPROTO_DCCP_))))
        return NULL;
    if ((has_helper && helper_len > MAX_NAME) || (has_labels && labels_len > MAX_LABELS))
        return NULL;

    /* the packed record: see flowrecord's module docstring */
    uint8_t rec[RECORD_MAX];
    uint8_t *w = rec;
    *w++ = 0x9e; /* fixarray 14 */
    *w++ = 1;
    w = mp_uint(w, (uint64_t)family);
    w = mp_uint(w, (uint64_t)l4);
    *w++ = 0x94;
    w = mp_bin(w, orig.src, alen_f);
    w = mp_bin(w, orig.dst, alen_f);
    w = mp_uint(w, orig.sport);
    w = mp_uint(w, orig.dport);
    *w++ = 0x94;
    w = mp_bin(w, reply.src, alen_f);
    w = mp_bin(w, reply.dst, alen_f);
    w = mp_uint(w, reply.sport);
    w = mp_uint(w, reply.dport);
    w = mp_uint(w, status);
    if (has_timeout)
        w = mp_uint(w, timeout);
    else
        *w++ = 0xc0;
    w = mp_uint(w, mark);
    w = mp_uint(w, zone);
    if (pi.n) {
        *w++ = (uint8_t)(0x90 | pi.n);
        for (int i = 0; i < pi.n; i++)
            w = mp_uint(w, pi.v[i]);
    } else {
        *w++ = 0xc0;
    }
    if (has_helper)
        w = mp_str(w, helper, helper_len);
    else
        *w++ = 0xc0;
    if (has_labels)
        w = mp_bin(w, labels, labels_len);
    else
        *w++ = 0xc0;
    if (has_sa_o || has_sa_r) {
        *w++ = 0x96;
        for (int i = 0; i < 3; i++)
            w = mp_uint(w, has_sa_o ? sa_o[i] : 0);
        for (int i = 0; i < 3; i++)
            w = mp_uint(w, has_sa_r ? sa_r[i] : 0);
    } else {
        *w++ = 0xc0;
    }
    if (has_master) {
        *w++ = 0x95;
        w = mp_uint(w, (uint64_t)master.l4);
        w = mp_bin(w, master.src, alen_f);
        w = mp_bin(w, master.dst, alen_f);
        w = mp_uint(w, master.sport);
        w = mp_uint(w, master.dport);
    } else {
        *w++ = 0xc0;
    }

    PyObject *record = PyBytes_FromStringAndSize((const char *)rec, w - rec);
    if (record == NULL)
        return NULL;
    PyObject *key = PyBytes_FromStringAndSize(NULL, 8 + 2 * alen_f);
    if (key == NULL) {
        Py_DECREF(record);
        return NULL;
    }
    uint8_t *k = (uint8_t *)PyBytes_AS_STRING(key);
    k[0] = (uint8_t)family;
    k[1] = (uint8_t)l4;
    put_be16(k + 2, zone);
    put_be16(k + 4, orig.sport);
    put_be16(k + 6, orig.dport);
    memcpy(k + 8, orig.src, (size_t)alen_f);
    memcpy(k + 8 + alen_f, orig.dst, (size_t)alen_f);
    int tcp_state = (pi.n && l4 == IPPROTO_TCP_) ? (int)pi.v[0] : -1;
    PyObject *ev = new_event(kind, key, mark, l4, tcp_state, status, record, portid);
    Py_DECREF(key);
    Py_DECREF(record);
    return ev;
}

/* The conntrack messages of b[pos:n] up to the first one not decoded here; returns its offset
 * (>= n when all were), or -1 with an exception set. */
static Py_ssize_t decode_buf(const uint8_t *b, Py_ssize_t n, Py_ssize_t pos, int dump,
                             PyObject *events)
{
    while (pos < n) {
        if (n - pos < 16)
            break;
        uint32_t mlen = rd_u32n(b + pos);
        uint16_t mtype = rd_u16n(b + pos + 4), mflags = rd_u16n(b + pos + 6);
        uint32_t portid = rd_u32n(b + pos + 12);
        if (mlen < 20 || (Py_ssize_t)mlen > n - pos)
            break;
        if (mtype != 0x100 && mtype != 0x102)
            break;
        long kind = dump ? 4 : mtype == 0x102 ? 3 : (mflags & 0x400) ? 1 : 2;
        PyObject *ev = decode_one(b, pos + 20, pos + (Py_ssize_t)mlen, b[pos + 16], kind, portid);
        if (ev == NULL) {
            if (PyErr_Occurred())
                return -1;
            break;
        }
        int r = PyList_Append(events, ev);
        Py_DECREF(ev);
        if (r < 0)
            return -1;
        pos += ((Py_ssize_t)mlen + 3) & ~(Py_ssize_t)3;
    }
    return pos;
}

static PyObject *py_decode_ct(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "decode_ct(buf, pos, dump, events)");
        return NULL;
    }
    PyObject *buf = args[0], *events = args[3];
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    int dump = PyObject_IsTrue(args[2]);
    if (dump < 0)
        return NULL;
    if (!PyList_Check(events)) {
        PyErr_SetString(PyExc_TypeError, "events must be a list");
        return NULL;
    }
    if (!PyBytes_CheckExact(buf) || event_type == NULL || pos < 0)
        return PyLong_FromSsize_t(pos);
    pos = decode_buf((const uint8_t *)PyBytes_AS_STRING(buf), PyBytes_GET_SIZE(buf), pos, dump,
                     events);
    if (pos < 0)
        return NULL;
    return PyLong_FromSsize_t(pos);
}

/* recv_events(fd, buf, max_calls, events) -> (calls, status, rest): up to max_calls receives
 * on the non-blocking netlink socket fd into the bytearray buf, each decoded into events as
 * decode() would. Stops after max_calls receives (status -1, rest None), when the socket has
 * nothing more (status 0: EAGAIN), on another error (status = errno, e.g. ENOBUFS; that call
 * not counted), or when a receive holds a message not decoded here (status -1, rest = the
 * bytes from that message on, for the Python decoder; that call counted). */
static PyObject *py_recv_events(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyByteArray_Check(args[1]) || !PyList_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "recv_events(fd, buf: bytearray, max_calls, events)");
        return NULL;
    }
    long fdl = PyLong_AsLong(args[0]);
    if (fdl == -1 && PyErr_Occurred())
        return NULL;
    if (fdl < 0 || fdl > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "bad file descriptor");
        return NULL;
    }
    int fd = (int)fdl;
    Py_ssize_t max_calls = PyLong_AsSsize_t(args[2]);
    if (max_calls == -1 && PyErr_Occurred())
        return NULL;
    if (event_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "set_event_type() first");
        return NULL;
    }
    PyObject *bufobj = args[1], *events = args[3];
    Py_ssize_t calls = 0;
    int status = -1;
    while (calls < max_calls) {
        /* the bytearray is not resized while this runs: only events are appended */
        uint8_t *b = (uint8_t *)PyByteArray_AS_STRING(bufobj);
        ssize_t n = recv(fd, b, (size_t)PyByteArray_GET_SIZE(bufobj), MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0)
                    return NULL;
                continue;
            }
            status = (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : errno;
            break;
        }
        calls++;
        Py_ssize_t pos = decode_buf(b, (Py_ssize_t)n, 0, 0, events);
        if (pos < 0)
            return NULL;
        if (pos < (Py_ssize_t)n) {
            PyObject *rest = PyBytes_FromStringAndSize((const char *)b + pos, (Py_ssize_t)n - pos);
            if (rest == NULL)
                return NULL;
            return Py_BuildValue("niN", calls, -1, rest);
        }
    }
    return Py_BuildValue("niO", calls, status, Py_None);
}

/* -- msgpack reading (a strict subset of msgpack.unpackb with unpack_fields' limits) ------- */

enum { MP_NIL, MP_UINT, MP_BIN, MP_STR, MP_ARR };

typedef struct {
    int kind;
    uint64_t u;
    const uint8_t *p;
    Py_ssize_t len;  /* bytes (bin, str) or elements (array) */
    int first;       /* arrays: index of the first element in rec_t.kids */
} mpv;

#define MP_TOP_MAX 16
#define MP_KIDS_MAX 64

typedef struct {
    mpv top[MP_TOP_MAX];
    int ntop;
    mpv kids[MP_KIDS_MAX];
    int nkids;
} rec_t;

/* one scalar (nil, non-negative int, bin up to 4096, ASCII str up to 64); -1 = decline */
static int mp_scalar(const uint8_t **pp, const uint8_t *end, mpv *v)
{
    const uint8_t *p = *pp;
    if (p >= end)
        return -1;
    uint8_t c = *p++;
    Py_ssize_t need = 0;
    v->p = NULL;
    v->len = 0;
    if (c < 0x80) {
        v->kind = MP_UINT;
        v->u = c;
    } else if (c == 0xc0) {
        v->kind = MP_NIL;
    } else if (c >= 0xcc && c <= 0xcf) {
        need = (Py_ssize_t)1 << (c - 0xcc);
        if (end - p < need)
            return -1;
        uint64_t u = 0;
        for (Py_ssize_t i = 0; i < need; i++)
            u = (u << 8) | p[i];
        p += need;
        v->kind = MP_UINT;
        v->u = u;
    } else if (c == 0xc4 || c == 0xc5 || (c & 0xe0) == 0xa0 || c == 0xd9 || c == 0xda) {
        Py_ssize_t n;
        if ((c & 0xe0) == 0xa0) {
            n = c & 0x1f;
        } else if (c == 0xc4 || c == 0xd9) {
            if (end - p < 1)
                return -1;
            n = *p++;
        } else {
            if (end - p < 2)
                return -1;
            n = (Py_ssize_t)rd_be16(p);
            p += 2;
        }
        if (end - p < n)
            return -1;
        if (c == 0xc4 || c == 0xc5) {
            if (n > 4096)
                return -1;
            v->kind = MP_BIN;
        } else {
            if (n > 64)
                return -1;
            for (Py_ssize_t i = 0; i < n; i++)
                if (p[i] >= 0x80)
                    return -1;
            v->kind = MP_STR;
        }
        v->p = p;
        v->len = n;
        p += n;
    } else {
        return -1;
    }
    *pp = p;
    return 0;
}

static int mp_record(const uint8_t *p, Py_ssize_t n, rec_t *r)
{
    const uint8_t *end = p + n;
    if (n < 1 || (*p & 0xf0) != 0x90)
        return -1;
    r->ntop = *p++ & 0x0f;
    r->nkids = 0;
    if (r->ntop < 14)
        return -1;
    for (int i = 0; i < r->ntop; i++) {
        mpv *v = &r->top[i];
        if (p < end && (*p & 0xf0) == 0x90) {
            int cnt = *p++ & 0x0f;
            if (r->nkids + cnt > MP_KIDS_MAX)
                return -1;
            v->kind = MP_ARR;
            v->len = cnt;
            v->first = r->nkids;
            for (int j = 0; j < cnt; j++)
                if (mp_scalar(&p, end, &r->kids[r->nkids++]) < 0)
                    return -1;
        } else if (mp_scalar(&p, end, v) < 0) {
            return -1;
        }
    }
    if (p != end)
        return -1;
    if (r->top[0].kind != MP_UINT || r->top[0].u != 1)
        return -1;
    return 0;
}

/* -- create encoding ---------------------------------------------------------------------- */

static uint8_t *put_tuple(uint8_t *w, uint16_t atype, int l4, const uint8_t *src,
                          const uint8_t *dst, Py_ssize_t alen, uint32_t sp, uint32_t dp)
{
    Py_ssize_t tlen = 4 + 4 + 2 * (4 + alen) + 28;
    put_hdr(w, (uint16_t)tlen, atype | NLA_F_NESTED);
    put_hdr(w + 4, (uint16_t)(4 + 2 * (4 + alen)), 1 | NLA_F_NESTED);
    w += 8;
    put_hdr(w, (uint16_t)(4 + alen), alen == 4 ? 1 : 3);
    memcpy(w + 4, src, (size_t)alen);
    w += 4 + alen;
    put_hdr(w, (uint16_t)(4 + alen), alen == 4 ? 2 : 4);
    memcpy(w + 4, dst, (size_t)alen);
    w += 4 + alen;
    put_hdr(w, 28, 2 | NLA_F_NESTED);
    put_hdr(w + 4, 5, 1);
    w[8] = (uint8_t)l4; w[9] = w[10] = w[11] = 0;
    put_hdr(w + 12, 6, 2);
    put_be16(w + 16, sp); w[18] = w[19] = 0;
    put_hdr(w + 20, 6, 3);
    put_be16(w + 24, dp); w[26] = w[27] = 0;
    w += 28;
    return w;
}

static uint8_t *put_u32attr(uint8_t *w, uint16_t atype, uint32_t v)
{
    put_hdr(w, 8, atype);
    put_be32(w + 4, v);
    return w + 8;
}

static uint8_t *put_nat(uint8_t *w, uint16_t atype, const uint8_t *addr, Py_ssize_t alen,
                        uint32_t port)
{
    put_hdr(w, (uint16_t)(alen == 4 ? 40 : 64), atype | NLA_F_NESTED);
    w += 4;
    put_hdr(w, (uint16_t)(4 + alen), alen == 4 ? 1 : 4);
    memcpy(w + 4, addr, (size_t)alen);
    w += 4 + alen;
    put_hdr(w, (uint16_t)(4 + alen), alen == 4 ? 2 : 5);
    memcpy(w + 4, addr, (size_t)alen);
    w += 4 + alen;
    put_hdr(w, 20, 3 | NLA_F_NESTED);
    put_hdr(w + 4, 6, 1);
    put_be16(w + 8, port); w[10] = w[11] = 0;
    put_hdr(w + 12, 6, 2);
    put_be16(w + 16, port); w[18] = w[19] = 0;
    return w + 20;
}

static int tuple_ok(const rec_t *r, const mpv *t, Py_ssize_t alen)
{
    if (t->kind != MP_ARR || t->len != 4)
        return 0;
    const mpv *k = &r->kids[t->first];
    return k[0].kind == MP_BIN && k[0].len == alen && k[1].kind == MP_BIN && k[1].len == alen
        && k[2].kind == MP_UINT && k[2].u <= 0xFFFF && k[3].kind == MP_UINT
        && k[3].u <= 0xFFFF;
}

static int get_u32(PyObject *o, uint32_t *out)
{
    if (!PyLong_Check(o))
        return -1;
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    if (v > 0xFFFFFFFFULL)
        return -1;
    *out = (uint32_t)v;
    return 0;
}

/* The create message, or NULL without an exception (not the fast path's shape). */
static PyObject *create_one(PyObject *record, uint32_t seq, uint32_t flags,
                            uint32_t default_timeout)
{
    rec_t r;
    if (!PyBytes_CheckExact(record))
        return NULL;
    if (mp_record((const uint8_t *)PyBytes_AS_STRING(record), PyBytes_GET_SIZE(record), &r) < 0)
        return NULL;
    if (r.ntop != 14)
        return NULL;
    const mpv *f = r.top;
    if (f[1].kind != MP_UINT || (f[1].u != AF_INET_ && f[1].u != AF_INET6_))
        return NULL;
    int family = (int)f[1].u;
    Py_ssize_t alen = family == AF_INET_ ? 4 : 16;
    if (f[2].kind != MP_UINT || !port_proto(f[2].u))
        return NULL;
    int l4 = (int)f[2].u;
    if (!tuple_ok(&r, &f[3], alen) || !tuple_ok(&r, &f[4], alen))
        return NULL;
    if (f[5].kind != MP_UINT)
        return NULL;
    uint64_t status = f[5].u;
    uint32_t timeout;
    if (f[6].kind == MP_NIL)
        timeout = default_timeout;
    else if (f[6].kind == MP_UINT && f[6].u <= 0xFFFFFFFFULL)
        timeout = (uint32_t)f[6].u;
    else
        return NULL;
    if (f[7].kind != MP_UINT || f[7].u > 0xFFFFFFFFULL)
        return NULL;
    uint32_t mark = (uint32_t)f[7].u;
    if (f[8].kind != MP_UINT || f[8].u != 0)
        return NULL;
    for (int i = 10; i < 14; i++)
        if (f[i].kind != MP_NIL)
            return NULL;
    const mpv *pi = NULL;
    if (f[9].kind != MP_NIL) {
        if (l4 != IPPROTO_TCP_ || f[9].kind != MP_ARR || f[9].len != 5)
            return NULL;
        pi = &r.kids[f[9].first];
        for (int i = 0; i < 5; i++)
            if (pi[i].kind != MP_UINT || pi[i].u > 0xFF)
                return NULL;
    }
    const mpv *o = &r.kids[f[3].first], *rp = &r.kids[f[4].first];
    const uint8_t *osrc = o[0].p, *odst = o[1].p;
    uint32_t osp = (uint32_t)o[2].u, odp = (uint32_t)o[3].u;
    const uint8_t *rsrc = rp[0].p, *rdst = rp[1].p;
    uint32_t rsp = (uint32_t)rp[2].u, rdp = (uint32_t)rp[3].u;

    uint8_t out[512];
    uint8_t *w = out + 20;
    uint8_t nat[160];
    uint8_t *nw = nat;
    if (status & (IPS_SRC_NAT | IPS_DST_NAT)) {
        if (status & IPS_DST_NAT)
            nw = put_nat(nw, CTA_NAT_DST, rsrc, alen, rsp);
        if (status & IPS_SRC_NAT)
            nw = put_nat(nw, CTA_NAT_SRC, rdst, alen, rdp);
        rsrc = odst;
        rdst = osrc;
        rsp = odp;
        rdp = osp;
    }
    w = put_tuple(w, 1, l4, osrc, odst, alen, osp, odp);
    w = put_tuple(w, 2, l4, rsrc, rdst, alen, rsp, rdp);
    w = put_u32attr(w, 3, (uint32_t)((status & CREATE_STATUS_MASK) | IPS_CONFIRMED));
    w = put_u32attr(w, 7, timeout);
    w = put_u32attr(w, 8, mark);
    if (pi != NULL) {
        memcpy(w, H_TCPINFO, 12);
        w[12] = (uint8_t)pi[0].u; w[13] = w[14] = w[15] = 0;
        memcpy(w + 16, H_TCPREST[0], 4);
        w[20] = (uint8_t)pi[1].u; w[21] = w[22] = w[23] = 0;
        memcpy(w + 24, H_TCPREST[1], 4);
        w[28] = (uint8_t)pi[2].u; w[29] = w[30] = w[31] = 0;
        memcpy(w + 32, H_TCPREST[2], 4);
        w[36] = (uint8_t)pi[3].u; w[37] = 0xFF; w[38] = w[39] = 0;
        memcpy(w + 40, H_TCPREST[3], 4);
        w[44] = (uint8_t)pi[4].u; w[45] = 0xFF; w[46] = w[47] = 0;
        w += 48;
    }
    memcpy(w, nat, (size_t)(nw - nat));
    w += nw - nat;
    uint32_t mlen = (uint32_t)(w - out);
    uint16_t mtype = 0x100, fl = (uint16_t)flags;
    uint32_t pid = 0;
    memcpy(out, &mlen, 4);
    memcpy(out + 4, &mtype, 2);
    memcpy(out + 6, &fl, 2);
    memcpy(out + 8, &seq, 4);
    memcpy(out + 12, &pid, 4);
    out[16] = (uint8_t)family; out[17] = 0; out[18] = out[19] = 0;
    return PyBytes_FromStringAndSize((const char *)out, (Py_ssize_t)mlen);
}

static PyObject *py_create(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "create(record, seq, flags, default_timeout)");
        return NULL;
    }
    uint32_t seq, flags, dt;
    if (get_u32(args[1], &seq) < 0 || get_u32(args[2], &flags) < 0 || flags > 0xFFFF
        || get_u32(args[3], &dt) < 0)
        Py_RETURN_NONE;
    PyObject *msg = create_one(args[0], seq, flags, dt);
    if (msg == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    return msg;
}

static PyObject *py_create_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "create_batch(records, seq_start, ack_last, default_timeout, fallback)");
        return NULL;
    }
    PyObject *seq_list = PySequence_Fast(args[0], "records must be a sequence");
    if (seq_list == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq_list);
    int ack_last = PyObject_IsTrue(args[2]);
    PyObject *parts = PyList_New(n);
    PyObject *result = NULL;
    if (ack_last < 0 || parts == NULL)
        goto done;
    uint32_t dt = 0;
    int dt_ok = get_u32(args[3], &dt) == 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *rec = PySequence_Fast_GET_ITEM(seq_list, i);
        int ack = ack_last && i == n - 1;
        PyObject *idx = PyLong_FromSsize_t(i);
        if (idx == NULL)
            goto done;
        PyObject *seq = PyNumber_Add(args[1], idx);
        Py_DECREF(idx);
        if (seq == NULL)
            goto done;
        PyObject *msg = NULL;
        uint32_t s;
        if (dt_ok && get_u32(seq, &s) == 0) {
            msg = create_one(rec, s, 0x1 | 0x400 | 0x200 | (ack ? 0x4 : 0), dt);
            if (msg == NULL && PyErr_Occurred()) {
                Py_DECREF(seq);
                goto done;
            }
        }
        if (msg == NULL)
            msg = PyObject_CallFunctionObjArgs(args[4], rec, seq, ack ? Py_True : Py_False,
                                               NULL);
        Py_DECREF(seq);
        if (msg == NULL)
            goto done;
        PyList_SET_ITEM(parts, i, msg);
    }
    {
        PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
        if (empty == NULL)
            goto done;
        result = _PyBytes_Join(empty, parts);
        Py_DECREF(empty);
    }
done:
    Py_XDECREF(parts);
    Py_DECREF(seq_list);
    return result;
}

/* -- the receiver's record check ---------------------------------------------------------- */

static PyObject *py_standby_check(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "standby_check(key, record)");
        return NULL;
    }
    PyObject *key = args[0], *record = args[1];
    rec_t r;
    if (!PyBytes_CheckExact(key) || PyBytes_GET_SIZE(key) < 2 || !PyBytes_CheckExact(record))
        Py_RETURN_NONE;
    if (mp_record((const uint8_t *)PyBytes_AS_STRING(record), PyBytes_GET_SIZE(record), &r) < 0)
        Py_RETURN_NONE;
    const mpv *f = r.top;
    if (f[2].kind != MP_UINT)
        Py_RETURN_NONE;
    if (f[2].u == IPPROTO_TCP_) {
        /* isinstance(pi, list) and pi and pi[0] in _TCP_REPLICABLE (ESTABLISHED..CLOSE) */
        int ok = 0;
        if (f[9].kind == MP_ARR && f[9].len > 0) {
            const mpv *k = &r.kids[f[9].first];
            ok = k->kind == MP_UINT && k->u >= 3 && k->u <= 8;
        }
        if (!ok)
            return PyLong_FromLong(0);
    }
    if (((const uint8_t *)PyBytes_AS_STRING(key))[1] == IPPROTO_TCP_)
        return PyLong_FromLong(1);
    return PyLong_FromLong(f[5].kind == MP_UINT && (f[5].u & IPS_SEEN_REPLY) ? 1 : 2);
}

static PyObject *py_set_event_type(PyObject *self, PyObject *arg)
{
    if (!PyType_Check(arg) || !PyType_IsSubtype((PyTypeObject *)arg, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "a tuple subclass is required");
        return NULL;
    }
    Py_INCREF(arg);
    Py_XSETREF(event_type, arg);
    Py_RETURN_NONE;
}

/* -- replication DATA bodies ------------------------------------------------------------- */

/* The message classes decode_data builds (lbsync.replication.wire.FlowUpdate, FlowDelete:
 * slotted frozen dataclasses) and their fields' slot descriptors, in field order. */
static PyObject *flow_update_type = NULL, *flow_delete_type = NULL;
static PyObject *update_slots[4], *delete_slots[3];

/* a msgpack unsigned integer (positive fixint, uint 8..64); -1 = decline */
static int mpw_uint(const uint8_t **pp, const uint8_t *end, uint64_t *out)
{
    const uint8_t *p = *pp;
    if (p >= end)
        return -1;
    uint8_t c = *p++;
    if (c < 0x80) {
        *out = c;
    } else if (c >= 0xcc && c <= 0xcf) {
        Py_ssize_t need = (Py_ssize_t)1 << (c - 0xcc);
        if (end - p < need)
            return -1;
        uint64_t u = 0;
        for (Py_ssize_t i = 0; i < need; i++)
            u = (u << 8) | p[i];
        p += need;
        *out = u;
    } else {
        return -1;
    }
    *pp = p;
    return 0;
}

/* a msgpack bin (8, 16 or 32) of lo..hi bytes; -1 = decline */
static int mpw_bin(const uint8_t **pp, const uint8_t *end, Py_ssize_t lo, Py_ssize_t hi,
                   const uint8_t **data, Py_ssize_t *len)
{
    const uint8_t *p = *pp;
    if (p >= end)
        return -1;
    uint8_t c = *p++;
    Py_ssize_t n;
    if (c == 0xc4) {
        if (end - p < 1)
            return -1;
        n = *p++;
    } else if (c == 0xc5) {
        if (end - p < 2)
            return -1;
        n = (Py_ssize_t)rd_be16(p);
        p += 2;
    } else if (c == 0xc6) {
        if (end - p < 4)
            return -1;
        n = (Py_ssize_t)rd_be32(p);
        p += 4;
    } else {
        return -1;
    }
    if (n < lo || n > hi || end - p < n)
        return -1;
    *data = p;
    *len = n;
    *pp = p + n;
    return 0;
}

/* an instance of a slotted class with its fields set through their slot descriptors (what
 * the frozen dataclass's __init__ does through object.__setattr__); steals the values */
static PyObject *new_message(PyObject *type, PyObject **slots, PyObject **values, int n)
{
    PyObject *obj = ((PyTypeObject *)type)->tp_alloc((PyTypeObject *)type, 0);
    int i = 0;
    if (obj != NULL) {
        for (; i < n; i++) {
            int rc = Py_TYPE(slots[i])->tp_descr_set(slots[i], obj, values[i]);
            Py_DECREF(values[i]);
            if (rc < 0) {
                i++;
                Py_CLEAR(obj);
                break;
            }
        }
    }
    for (; i < n; i++)
        Py_DECREF(values[i]);
    return obj;
}

/* decode_data(body, buckets, max_key, max_bin) -> list | None: wire.decode_body of a DATA
 * body made only of flow updates and flow deletes, or None (declined: anything else, and
 * anything the Python decoder would reject). */
static PyObject *py_decode_data(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyBytes_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "decode_data(body: bytes, buckets, max_key, max_bin)");
        return NULL;
    }
    if (flow_update_type == NULL || flow_delete_type == NULL)
        Py_RETURN_NONE;
    Py_ssize_t buckets = PyLong_AsSsize_t(args[1]);
    Py_ssize_t max_key = PyLong_AsSsize_t(args[2]);
    Py_ssize_t max_bin = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred())
        return NULL;
    const uint8_t *p = (const uint8_t *)PyBytes_AS_STRING(args[0]);
    const uint8_t *end = p + PyBytes_GET_SIZE(args[0]);
    Py_ssize_t count;
    if (p >= end)
        Py_RETURN_NONE;
    if ((*p & 0xf0) == 0x90) {
        count = *p++ & 0x0f;
    } else if (*p == 0xdc && end - p >= 3) {
        count = (Py_ssize_t)rd_be16(p + 1);
        p += 3;
    } else {
        Py_RETURN_NONE;
    }
    /* every message takes at least 5 bytes: a count the body cannot hold is declined */
    if (count < 1 || count > (end - p) / 5 || count > max_bin)
        Py_RETURN_NONE;
    PyObject *out = PyList_New(count);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (p + 2 > end || (p[0] != 0x95 && p[0] != 0x94) || p[1] != (p[0] == 0x95 ? 1 : 2))
            goto decline;
        int update = p[0] == 0x95;
        p += 2;
        uint64_t bucket, epoch;
        const uint8_t *key, *rec = NULL;
        Py_ssize_t klen, rlen = 0;
        if (mpw_uint(&p, end, &bucket) < 0 || bucket >= (uint64_t)buckets
                || mpw_uint(&p, end, &epoch) < 0 || epoch > 0xFFFFFFFFu
                || mpw_bin(&p, end, 1, max_key < max_bin ? max_key : max_bin, &key, &klen) < 0)
            goto decline;
        if (update && mpw_bin(&p, end, 0, max_bin, &rec, &rlen) < 0)
            goto decline;
        PyObject *v[4];
        v[0] = PyLong_FromUnsignedLongLong(bucket);
        v[1] = PyLong_FromUnsignedLongLong(epoch);
        v[2] = PyBytes_FromStringAndSize((const char *)key, klen);
        v[3] = update ? PyBytes_FromStringAndSize((const char *)rec, rlen) : NULL;
        int n = update ? 4 : 3;
        for (int j = 0; j < n; j++) {
            if (v[j] == NULL) {
                for (int k = 0; k < n; k++)
                    Py_XDECREF(v[k]);
                Py_DECREF(out);
                return NULL;
            }
        }
        PyObject *m = update ? new_message(flow_update_type, update_slots, v, 4)
                             : new_message(flow_delete_type, delete_slots, v, 3);
        if (m == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, m);
    }
    if (p != end)
        goto decline;
    return out;
decline:
    Py_DECREF(out);  /* items not yet set are NULL: list dealloc skips them */
    Py_RETURN_NONE;
}

static int load_slots(PyObject *type, const char *const *names, PyObject **slots, int n)
{
    for (int i = 0; i < n; i++) {
        PyObject *d = PyObject_GetAttrString(type, names[i]);
        if (d == NULL)
            return -1;
        if (Py_TYPE(d) != &PyMemberDescr_Type) {
            Py_DECREF(d);
            PyErr_Format(PyExc_TypeError, "%s is not a slot", names[i]);
            return -1;
        }
        Py_XSETREF(slots[i], d);
    }
    return 0;
}

/* set_message_types(FlowUpdate, FlowDelete): the classes decode_data builds */
static PyObject *py_set_message_types(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    static const char *const update_names[] = {"bucket", "owner_epoch", "key", "record"};
    if (nargs != 2 || !PyType_Check(args[0]) || !PyType_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "set_message_types(FlowUpdate, FlowDelete)");
        return NULL;
    }
    if (load_slots(args[0], update_names, update_slots, 4) < 0
            || load_slots(args[1], update_names, delete_slots, 3) < 0)
        return NULL;
    Py_INCREF(args[0]);
    Py_XSETREF(flow_update_type, args[0]);
    Py_INCREF(args[1]);
    Py_XSETREF(flow_delete_type, args[1]);
    Py_RETURN_NONE;
}

/* -- store digests: BLAKE2b-64 entry hashes ------------------------------------------------
 * BLAKE2b from libb2 (the BLAKE2 authors' library, Debian libb2-dev): a well-kept
 * implementation with runtime SIMD dispatch, rather than our own compression function. */

/* store.entry_hash: BLAKE2b with an 8-byte digest (no key, salt or personalisation) over
 * kind (u8), len(key) (u16 big endian), key, record; the digest read big endian */
static uint64_t entry_hash64(uint8_t kind, const uint8_t *key, Py_ssize_t klen,
                             const uint8_t *rec, Py_ssize_t rlen)
{
    blake2b_state st;
    uint8_t prefix[3] = {kind, (uint8_t)(klen >> 8), (uint8_t)klen};
    uint8_t digest[8];
    blake2b_init(&st, 8);
    blake2b_update(&st, prefix, 3);
    blake2b_update(&st, key, (size_t)klen);
    blake2b_update(&st, rec, (size_t)rlen);
    blake2b_final(&st, digest, 8);
    uint64_t out = 0;
    for (int i = 0; i < 8; i++)
        out = (out << 8) | digest[i];
    return out;
}

static int entry_args(PyObject *key, PyObject *rec)
{
    return PyBytes_CheckExact(key) && PyBytes_CheckExact(rec) && PyBytes_GET_SIZE(key) < 65536;
}

/* The kind argument of the digest functions: 0..255; -1: out of range (the caller declines);
 * -2: not an int (exception set). */
static int entry_kind(PyObject *arg)
{
    long kind = PyLong_AsLong(arg);
    if (kind == -1 && PyErr_Occurred())
        return -2;
    return kind < 0 || kind > 255 ? -1 : (int)kind;
}

#define ENTRY_HASH(kind, key, rec)                                                       \
    entry_hash64((kind), (const uint8_t *)PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), \
                 (const uint8_t *)PyBytes_AS_STRING(rec), PyBytes_GET_SIZE(rec))

/* entry_hash(kind, key, record) -> int | None */
static PyObject *py_entry_hash(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "entry_hash(kind, key, record)");
        return NULL;
    }
    int kind = entry_kind(args[0]);
    if (kind == -2)
        return NULL;
    if (kind < 0 || !entry_args(args[1], args[2]))
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(ENTRY_HASH((uint8_t)kind, args[1], args[2]));
}

/* digest_sum(kind, table) -> int | None: the sum mod 2**64 of entry_hash over a store
 * table's (key, record) items */
static PyObject *py_digest_sum(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyDict_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "digest_sum(kind, table: dict)");
        return NULL;
    }
    int kind = entry_kind(args[0]);
    if (kind == -2)
        return NULL;
    if (kind < 0)
        Py_RETURN_NONE;
    uint64_t total = 0;
    Py_ssize_t pos = 0;
    PyObject *key, *rec;
    while (PyDict_Next(args[1], &pos, &key, &rec)) {
        if (!entry_args(key, rec))
            Py_RETURN_NONE;
        total += ENTRY_HASH((uint8_t)kind, key, rec);
    }
    return PyLong_FromUnsignedLongLong(total);
}

/* digest_delta(kind, changed, table) -> int | None: for each key -> old record (None:
 * absent) of ``changed`` whose record in ``table`` differs, the new summand minus the old,
 * summed mod 2**64 (the store's incremental digest) */
static PyObject *py_digest_delta(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyDict_CheckExact(args[1]) || !PyDict_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "digest_delta(kind, changed: dict, table: dict)");
        return NULL;
    }
    int kind = entry_kind(args[0]);
    if (kind == -2)
        return NULL;
    if (kind < 0)
        Py_RETURN_NONE;
    uint64_t total = 0;
    Py_ssize_t pos = 0;
    PyObject *key, *old;
    while (PyDict_Next(args[1], &pos, &key, &old)) {
        if (!PyBytes_CheckExact(key))
            Py_RETURN_NONE;
        PyObject *new = PyDict_GetItemWithError(args[2], key);  /* borrowed */
        if (new == NULL && PyErr_Occurred())
            return NULL;
        if (new == old)
            continue;
        if (old != Py_None && new != NULL && PyBytes_CheckExact(old) && PyBytes_CheckExact(new)
                && PyBytes_GET_SIZE(old) == PyBytes_GET_SIZE(new)
                && memcmp(PyBytes_AS_STRING(old), PyBytes_AS_STRING(new),
                          (size_t)PyBytes_GET_SIZE(old)) == 0)
            continue;  /* equal records: no change */
        if (old != Py_None) {
            if (!entry_args(key, old))
                Py_RETURN_NONE;
            total -= ENTRY_HASH((uint8_t)kind, key, old);
        }
        if (new != NULL) {
            if (!entry_args(key, new))
                Py_RETURN_NONE;
            total += ENTRY_HASH((uint8_t)kind, key, new);
        }
    }
    return PyLong_FromUnsignedLongLong(total);
}

/* -- the owner sweep's keys-only dump decoder ------------------------------------------- */

#define NLMSG_ERROR_ 2
#define NLMSG_DONE_ 3
#define NLM_F_DUMP_INTR_ 0x10
#define CT_NEW_ 0x100

/* keys_of_dump(buf, marks, keys) -> (done, interrupted) | None: lbsync.kernel.conntrack's
 * keys_of_dump (adds to the set ``keys`` the key of every CT_NEW entry whose mark is in
 * ``marks``). None for anything the Python function would raise on (malformed, a tuple it
 * cannot read, an NLMSG_ERROR with an error) or a CTA_MARK/CTA_ZONE of an odd size: the
 * caller then runs the Python function on the same buffer (adding the same keys again to a
 * set is harmless). */
static PyObject *py_keys_of_dump(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyBytes_CheckExact(args[0]) || !PySet_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "keys_of_dump(buf: bytes, marks, keys: set)");
        return NULL;
    }
    const uint8_t *b = (const uint8_t *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]), pos = 0;
    PyObject *marks = args[1], *keys = args[2];
    int done = 0, interrupted = 0;
    while (pos < n) {
        if (n - pos < 16)
            Py_RETURN_NONE;
        Py_ssize_t mlen = (Py_ssize_t)rd_u32n(b + pos);
        uint16_t mtype = rd_u16n(b + pos + 4), mflags = rd_u16n(b + pos + 6);
        if (mlen < 16 || mlen > n - pos)
            Py_RETURN_NONE;
        Py_ssize_t end = pos + mlen;
        if (mflags & NLM_F_DUMP_INTR_)
            interrupted = 1;
        if (mtype == CT_NEW_) {
            if (mlen < 20)
                Py_RETURN_NONE;
            int family = b[pos + 16];
            Py_ssize_t orig = -1, orig_end = 0, p = pos + 20;
            uint32_t mark = 0, zone = 0;
            while (p < end) {
                if (end - p < 4)
                    Py_RETURN_NONE;
                Py_ssize_t alen = rd_u16n(b + p);
                int atype = rd_u16n(b + p + 2) & NLA_TYPE_MASK;
                if (alen < 4 || p + alen > end)
                    Py_RETURN_NONE;
                if (atype == 1) {
                    orig = p + 4;
                    orig_end = p + alen;
                } else if (atype == 8) {
                    if (alen != 8)
                        Py_RETURN_NONE;
                    mark = rd_be32(b + p + 4);
                } else if (atype == 18) {
                    if (alen != 6)
                        Py_RETURN_NONE;
                    zone = rd_be16(b + p + 4);
                }
                p += (alen + 3) & ~(Py_ssize_t)3;
            }
            if (orig < 0)
                Py_RETURN_NONE;
            PyObject *m = PyLong_FromUnsignedLong(mark);
            if (m == NULL)
                return NULL;
            int in = PySequence_Contains(marks, m);
            Py_DECREF(m);
            if (in < 0)
                return NULL;
            if (in) {
                ctuple t;
                if (parse_tuple(b, orig, orig_end, &t) < 0)
                    Py_RETURN_NONE;
                PyObject *key = PyBytes_FromStringAndSize(NULL, 8 + 2 * t.slen);
                if (key == NULL)
                    return NULL;
                uint8_t *k = (uint8_t *)PyBytes_AS_STRING(key);
                k[0] = (uint8_t)family;
                k[1] = (uint8_t)t.l4;
                put_be16(k + 2, zone);
                put_be16(k + 4, t.sport);
                put_be16(k + 6, t.dport);
                memcpy(k + 8, t.src, (size_t)t.slen);
                memcpy(k + 8 + t.slen, t.dst, (size_t)t.slen);
                int rc = PySet_Add(keys, key);
                Py_DECREF(key);
                if (rc < 0)
                    return NULL;
            }
        } else if (mtype == NLMSG_DONE_) {
            done = 1;
        } else if (mtype == NLMSG_ERROR_) {
            if (mlen < 20 || rd_u32n(b + pos + 16) != 0)
                Py_RETURN_NONE;  /* the Python function raises (truncated, or KernelError) */
        }
        pos += (mlen + 3) & ~(Py_ssize_t)3;
    }
    return Py_BuildValue("(OO)", done ? Py_True : Py_False, interrupted ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"decode_ct", (PyCFunction)(void (*)(void))py_decode_ct, METH_FASTCALL,
     "decode_ct(buf, pos, dump, events) -> offset of the first message not decoded"},
    {"recv_events", (PyCFunction)(void (*)(void))py_recv_events, METH_FASTCALL,
     "recv_events(fd, buf, max_calls, events) -> (calls, status, rest)"},
    {"create", (PyCFunction)(void (*)(void))py_create, METH_FASTCALL,
     "create(record, seq, flags, default_timeout) -> bytes | None"},
    {"create_batch", (PyCFunction)(void (*)(void))py_create_batch, METH_FASTCALL,
     "create_batch(records, seq_start, ack_last, default_timeout, fallback) -> bytes"},
    {"standby_check", (PyCFunction)(void (*)(void))py_standby_check, METH_FASTCALL,
     "standby_check(key, record) -> 0 | 1 | 2 | None"},
    {"set_event_type", py_set_event_type, METH_O, "set_event_type(CtEvent)"},
    {"decode_data", (PyCFunction)(void (*)(void))py_decode_data, METH_FASTCALL,
     "decode_data(body, buckets, max_key, max_bin) -> list | None"},
    {"entry_hash", (PyCFunction)(void (*)(void))py_entry_hash, METH_FASTCALL,
     "entry_hash(kind, key, record) -> int | None"},
    {"digest_sum", (PyCFunction)(void (*)(void))py_digest_sum, METH_FASTCALL,
     "digest_sum(kind, table) -> int | None"},
    {"digest_delta", (PyCFunction)(void (*)(void))py_digest_delta, METH_FASTCALL,
     "digest_delta(kind, changed, table) -> int | None"},
    {"keys_of_dump", (PyCFunction)(void (*)(void))py_keys_of_dump, METH_FASTCALL,
     "keys_of_dump(buf, marks, keys) -> (done, interrupted) | None"},
    {"set_message_types", (PyCFunction)(void (*)(void))py_set_message_types, METH_FASTCALL,
     "set_message_types(FlowUpdate, FlowDelete)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "lbsync._ctfast",
    "ctnetlink codec hot paths in C (see lbsync/kernel/ctnetlink.py)", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ctfast(void)
{
    prefix_init(&PREFIX4, 4);
    prefix_init(&PREFIX6, 16);
    put_hdr(H_TCPINFO, 48, 4 | NLA_F_NESTED);
    put_hdr(H_TCPINFO + 4, 44, 1 | NLA_F_NESTED);
    put_hdr(H_TCPINFO + 8, 5, 1);
    put_hdr(H_TCPREST[0], 5, 2);
    put_hdr(H_TCPREST[1], 5, 3);
    put_hdr(H_TCPREST[2], 6, 4);
    put_hdr(H_TCPREST[3], 6, 5);
    return PyModule_Create(&module);
}
