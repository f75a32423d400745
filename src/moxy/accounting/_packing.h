/* What moxy.accounting._packer (which packs the serving process's events) and
   moxy.accounting._frames (which unpacks them in the accounting process) share: the field
   tags of moxy.accounting.packing's encoding. */

#ifndef MOXY_PACKING_H
#define MOXY_PACKING_H

enum { SAME, STR, INT, FLOAT, STRS, OTHER };
#define MAX_FIELDS 255 /* fields of an entry at most */

#endif
