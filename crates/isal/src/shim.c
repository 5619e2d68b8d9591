/*
 * The few calls Coffer makes into ISA-L's inflater. Rust cannot allocate `struct inflate_state`
 * (its size and layout come from the C header), so the state lives behind an opaque pointer
 * made, stepped and freed here.
 */
#include <stdint.h>
#include <stdlib.h>
#include <isa-l/igzip_lib.h>

struct inflate_state *coffer_isal_gzip_new(void)
{
	struct inflate_state *s = malloc(sizeof(*s));
	if (s != NULL) {
		isal_inflate_init(s);
		s->crc_flag = ISAL_GZIP;
	}
	return s;
}

/* Ready for the next gzip member of a multi-member stream. */
void coffer_isal_gzip_reset(struct inflate_state *s)
{
	isal_inflate_reset(s);
	s->crc_flag = ISAL_GZIP;
}

void coffer_isal_gzip_free(struct inflate_state *s)
{
	free(s);
}

/*
 * One step: inflates from `in` (`*in_len` bytes) into `out` (`*out_len` bytes). On return
 * `*in_len` is what was consumed, `*out_len` what was produced, and `*finished` says whether
 * the member ended (its trailer's CRC-32 and size checked). Returns ISA-L's status: 0, or a
 * negative ISAL_* error.
 */
int coffer_isal_gzip_step(struct inflate_state *s, const uint8_t *in, uint32_t *in_len,
			  uint8_t *out, uint32_t *out_len, int *finished)
{
	int rc;

	/* isal_inflate never writes through next_in. */
	s->next_in = (uint8_t *)in;
	s->avail_in = *in_len;
	s->next_out = out;
	s->avail_out = *out_len;
	rc = isal_inflate(s);
	*in_len -= s->avail_in;
	*out_len -= s->avail_out;
	*finished = s->block_state == ISAL_BLOCK_FINISH;
	/* The caller's buffers are not the state's to keep. */
	s->next_in = NULL;
	s->avail_in = 0;
	s->next_out = NULL;
	s->avail_out = 0;
	return rc;
}
