/* Minimal HTTP/1.x request-head parser for the guest service.
 *
 * Only what a counter service needs: method, path, query, keep-alive decision and the size of a
 * request body to skip. Never reads past `len`; rejects anything it does not understand. */
#ifndef FTVM_GUEST_HTTP_H
#define FTVM_GUEST_HTTP_H

#include <stddef.h>

#define HTTP_METHOD_MAX 16
#define HTTP_PATH_MAX 256
#define HTTP_QUERY_MAX 256

struct http_request {
    char method[HTTP_METHOD_MAX];
    char path[HTTP_PATH_MAX];   /* without the query string */
    char query[HTTP_QUERY_MAX]; /* after '?', may be empty */
    int keep_alive;             /* 1: the connection stays open after the reply */
    unsigned long long body_len; /* Content-Length of the request (bytes to skip) */
};

enum http_parse_result {
    HTTP_INCOMPLETE = 0, /* need more bytes */
    HTTP_BAD = -1,       /* malformed: reply 400 and close */
    HTTP_UNSUPPORTED = -2 /* e.g. chunked request bodies: reply 501 and close */
};

/* Parses one request head at the start of buf[0..len).
 * Returns the head's length in bytes (> 0, including the blank line) when complete,
 * or an enum http_parse_result value. */
long http_parse(const char *buf, size_t len, struct http_request *req);

/* Finds `key` in a query string like "a=1&pages=20"; copies its value into out (NUL-terminated).
 * Returns 1 if found, 0 if not. */
int http_query_get(const char *query, const char *key, char *out, size_t out_size);

#endif
