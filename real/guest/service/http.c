/* Minimal HTTP/1.x request-head parser (see http.h). */
#include "http.h"

#include <string.h>

/* Larger request bodies are refused as malformed (the parser never allocates them anyway). */
#define MAX_CONTENT_LENGTH 1000000000000ULL

static int lower(int c) { return (c >= 'A' && c <= 'Z') ? c - 'A' + 'a' : c; }

/* Case-insensitive comparison of buf[0..n) with the NUL-terminated word. */
static int eq_nocase(const char *buf, size_t n, const char *word)
{
    size_t i;
    if (strlen(word) != n)
        return 0;
    for (i = 0; i < n; i++)
        if (lower((unsigned char)buf[i]) != lower((unsigned char)word[i]))
            return 0;
    return 1;
}

static int is_token_char(int c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

/* Length of the head including the terminating blank line, or 0 if not complete yet.
 * Accepts CRLF and bare LF line ends. */
static size_t head_length(const char *buf, size_t len)
{
    size_t i;
    for (i = 0; i < len; i++) {
        if (buf[i] != '\n')
            continue;
        if (i + 1 < len && buf[i + 1] == '\n')
            return i + 2;
        if (i + 2 < len && buf[i + 1] == '\r' && buf[i + 2] == '\n')
            return i + 3;
    }
    return 0;
}

/* Trims spaces/tabs and a trailing CR off [*s, *e). */
static void trim(const char **s, const char **e)
{
    while (*s < *e && (**s == ' ' || **s == '\t'))
        (*s)++;
    while (*e > *s && ((*e)[-1] == ' ' || (*e)[-1] == '\t' || (*e)[-1] == '\r'))
        (*e)--;
}

/* Applies a Connection header value: a comma-separated list of tokens. */
static void apply_connection(const char *s, const char *e, struct http_request *req)
{
    while (s < e) {
        const char *comma = memchr(s, ',', (size_t)(e - s));
        const char *te = comma ? comma : e;
        const char *ts = s;
        trim(&ts, &te);
        if (eq_nocase(ts, (size_t)(te - ts), "close"))
            req->keep_alive = 0;
        else if (eq_nocase(ts, (size_t)(te - ts), "keep-alive"))
            req->keep_alive = 1;
        s = comma ? comma + 1 : e;
    }
}

/* Parses the request line [s, e). Returns 0 or HTTP_BAD. */
static int parse_request_line(const char *s, const char *e, struct http_request *req)
{
    const char *p = s, *target, *target_end, *q;
    size_t n;

    while (p < e && is_token_char((unsigned char)*p))
        p++;
    n = (size_t)(p - s);
    if (n == 0 || n >= HTTP_METHOD_MAX || p >= e || *p != ' ')
        return HTTP_BAD;
    memcpy(req->method, s, n);
    req->method[n] = '\0';

    target = ++p;
    while (p < e && *p != ' ')
        if ((unsigned char)*p++ <= 0x20)
            return HTTP_BAD;
    target_end = p;
    if (p >= e || target == target_end)
        return HTTP_BAD;
    /* absolute-form: "http://host/path" -> "/path" */
    if ((size_t)(target_end - target) > 7 && eq_nocase(target, 7, "http://")) {
        target += 7;
        while (target < target_end && *target != '/')
            target++;
        if (target == target_end)
            return HTTP_BAD;
    }
    if (*target != '/')
        return HTTP_BAD;
    q = memchr(target, '?', (size_t)(target_end - target));
    n = (size_t)((q ? q : target_end) - target);
    if (n >= HTTP_PATH_MAX)
        return HTTP_BAD;
    memcpy(req->path, target, n);
    req->path[n] = '\0';
    if (q) {
        n = (size_t)(target_end - q - 1);
        if (n >= HTTP_QUERY_MAX)
            return HTTP_BAD;
        memcpy(req->query, q + 1, n);
        req->query[n] = '\0';
    }

    p++; /* the space before the version */
    n = (size_t)(e - p);
    if (n == 8 && memcmp(p, "HTTP/1.1", 8) == 0)
        req->keep_alive = 1;
    else if (n == 8 && memcmp(p, "HTTP/1.0", 8) == 0)
        req->keep_alive = 0;
    else
        return HTTP_BAD;
    return 0;
}

/* Parses one header line [s, e). Returns 0, HTTP_BAD or HTTP_UNSUPPORTED. */
static int parse_header(const char *s, const char *e, struct http_request *req, int *seen_length)
{
    const char *colon = memchr(s, ':', (size_t)(e - s));
    const char *p, *vs, *ve;
    unsigned long long v = 0;

    if (!colon || colon == s)
        return HTTP_BAD;
    for (p = s; p < colon; p++)
        if (!is_token_char((unsigned char)*p))
            return HTTP_BAD; /* also refuses obsolete line folding (leading space) */
    vs = colon + 1;
    ve = e;
    trim(&vs, &ve);
    if (eq_nocase(s, (size_t)(colon - s), "connection")) {
        apply_connection(vs, ve, req);
    } else if (eq_nocase(s, (size_t)(colon - s), "transfer-encoding")) {
        return HTTP_UNSUPPORTED;
    } else if (eq_nocase(s, (size_t)(colon - s), "content-length")) {
        if (vs == ve)
            return HTTP_BAD;
        for (p = vs; p < ve; p++) {
            if (*p < '0' || *p > '9')
                return HTTP_BAD;
            v = v * 10 + (unsigned)(*p - '0');
            if (v > MAX_CONTENT_LENGTH)
                return HTTP_BAD;
        }
        if (*seen_length && v != req->body_len)
            return HTTP_BAD;
        *seen_length = 1;
        req->body_len = v;
    }
    return 0;
}

long http_parse(const char *buf, size_t len, struct http_request *req)
{
    size_t skip = 0, head;
    const char *s, *end;
    int seen_length = 0, r;

    /* A client may send empty lines between requests (RFC 9112 §2.2): skip them. */
    while (skip < len && (buf[skip] == '\r' || buf[skip] == '\n'))
        skip++;
    head = head_length(buf + skip, len - skip);
    if (head == 0)
        return HTTP_INCOMPLETE;

    memset(req, 0, sizeof *req);
    s = buf + skip;
    end = s + head;
    {
        const char *nl = memchr(s, '\n', (size_t)(end - s));
        const char *le = nl;
        if (le > s && le[-1] == '\r')
            le--;
        if ((r = parse_request_line(s, le, req)) != 0)
            return r;
        s = nl + 1;
    }
    while (s < end) {
        const char *nl = memchr(s, '\n', (size_t)(end - s));
        const char *le = nl;
        if (le > s && le[-1] == '\r')
            le--;
        if (le == s)
            break; /* the blank line */
        if ((r = parse_header(s, le, req, &seen_length)) != 0)
            return r;
        s = nl + 1;
    }
    return (long)(skip + head);
}

int http_query_get(const char *query, const char *key, char *out, size_t out_size)
{
    size_t klen = strlen(key);
    const char *p = query;

    while (*p) {
        const char *amp = strchr(p, '&');
        const char *pe = amp ? amp : p + strlen(p);
        if ((size_t)(pe - p) > klen && strncmp(p, key, klen) == 0 && p[klen] == '=') {
            size_t n = (size_t)(pe - p - klen - 1);
            if (n >= out_size)
                return 0;
            memcpy(out, p + klen + 1, n);
            out[n] = '\0';
            return 1;
        }
        if ((size_t)(pe - p) == klen && strncmp(p, key, klen) == 0) {
            if (out_size == 0)
                return 0;
            out[0] = '\0';
            return 1;
        }
        p = amp ? amp + 1 : pe;
    }
    return 0;
}
